// The page's half of a conversation: the session-start message, microphone frames out,
// model frames and transcript in. The wire format is documented at the top of server.py.
// URL parameters ?voice=NAME&prompt=TEXT preselect the pickers; ?autostart starts at load;
// ?token=T is passed on to the server (serve --token).

"use strict";

const KIND = { START: 0, AUDIO: 1, TEXT: 2, ERROR: 3 };
const RATE = 24000, FRAME = 1920;
const AUDIBLE = 1e-3; // a frame peaking above this is counted as sound, not silence

// Counters for the stats line, also read by the browser test (window.personaplex).
const stats = { state: "idle", rate: 0, captured: 0, heard: 0, sent: 0, received: 0, audible: 0, tokens: 0, text: "", error: "" };
window.personaplex = stats;

const $ = (id) => document.getElementById(id);
const TOKEN = new URLSearchParams(location.search).get("token");
let conn = null;

function withToken(path) {
  const url = new URL(path, location.href);
  if (TOKEN) url.searchParams.set("token", TOKEN);
  return url;
}

function setStatus(state, detail) {
  stats.state = state;
  $("status").textContent = detail || state;
  $("status").className = state === "error" ? "error" : "";
  $("toggle").textContent = state === "idle" || state === "error" ? "Start" : "Stop";
  $("toggle").className = state === "idle" || state === "error" ? "" : "stop";
}

function renderStats() {
  $("stats").textContent = `audio at ${stats.rate} Hz; sent ${stats.sent} frames (${stats.heard} audible), `
    + `received ${stats.received} `
    + `(${stats.audible} audible), ${stats.tokens} text tokens`;
}

function peak(x) {
  let m = 0;
  for (let i = 0; i < x.length; i++) m = Math.max(m, Math.abs(x[i]));
  return m;
}

function packet(kind, payload) {
  const bytes = payload instanceof Float32Array ? new Uint8Array(payload.buffer, payload.byteOffset, payload.byteLength)
    : new TextEncoder().encode(JSON.stringify(payload));
  const out = new Uint8Array(1 + bytes.length);
  out[0] = kind;
  out.set(bytes, 1);
  return out;
}

async function start() {
  setStatus("connecting", "starting audio…");
  $("transcript").textContent = "";
  Object.assign(stats, { captured: 0, heard: 0, sent: 0, received: 0, audible: 0, tokens: 0, text: "", error: "" });
  const c = conn = { ready: false };
  try {
    c.mic = await navigator.mediaDevices.getUserMedia(
      { audio: { channelCount: 1, echoCancellation: true, noiseSuppression: false, autoGainControl: true } });
    c.ctx = new AudioContext({ latencyHint: "interactive" });
    await c.ctx.audioWorklet.addModule("worklet.js");
    c.node = new AudioWorkletNode(c.ctx, "duplex", {
      numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1],
      processorOptions: { rate: RATE, frameSize: FRAME, prebufferFrames: 2 },
    });
    c.ctx.createMediaStreamSource(c.mic).connect(c.node);
    c.node.connect(c.ctx.destination);
    await c.ctx.resume();
    stats.rate = c.ctx.sampleRate;
  } catch (e) {
    stop();
    return fail(`audio: ${e.message || e}`);
  }
  c.node.port.onmessage = (e) => onMicFrame(c, e.data);
  c.node.onprocessorerror = () => { stop(); fail("the audio worklet stopped (see the console)"); };
  const url = withToken("ws");
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  c.ws = new WebSocket(url);
  c.ws.binaryType = "arraybuffer";
  c.ws.onopen = () => {
    setStatus("connecting", "preparing the session…");
    c.ws.send(packet(KIND.START, { voice: $("voice").value, prompt: $("prompt").value.trim() }));
  };
  c.ws.onmessage = (e) => onMessage(c, new Uint8Array(e.data));
  c.ws.onclose = (e) => {
    if (conn !== c) return;
    stop();
    if (stats.state !== "error") setStatus("idle", `disconnected${e.reason ? ": " + e.reason : ""}`);
  };
}

function onMicFrame(c, frame) {
  const p = peak(frame);
  stats.captured++;
  if (p > AUDIBLE) stats.heard++;
  $("mic-level").value = Math.min(1, p * 2);
  // Before READY the server is not listening yet; with a backed-up socket the frame
  // would arrive too late to be useful.
  if (!c.ready || c.ws.readyState !== WebSocket.OPEN || c.ws.bufferedAmount > 8 * 4 * FRAME) return;
  c.ws.send(packet(KIND.AUDIO, frame));
  stats.sent++;
}

function onMessage(c, data) {
  const kind = data[0], body = data.subarray(1);
  if (kind === KIND.AUDIO) {
    const frame = new Float32Array(body.slice().buffer);
    const p = peak(frame);
    stats.received++;
    if (p > AUDIBLE) stats.audible++;
    $("model-level").value = Math.min(1, p * 2);
    c.node.port.postMessage(frame, [frame.buffer]);
    if (stats.received % 5 === 0) renderStats();
    return;
  }
  const msg = JSON.parse(new TextDecoder().decode(body));
  if (kind === KIND.START) {
    c.ready = true;
    setStatus("live", `live${msg.voice ? " · voice " + msg.voice : ""}${msg.prompt ? " · prompted" : ""}`);
  } else if (kind === KIND.TEXT) {
    stats.tokens++;
    stats.text += msg.text;
    const t = $("transcript");
    t.textContent += msg.text;
    t.scrollTop = t.scrollHeight;
  } else if (kind === KIND.ERROR) {
    fail(msg.error);
  }
}

function fail(error) {
  stats.error = error;
  setStatus("error", `error: ${error}`);
}

function stop() {
  const c = conn;
  conn = null;
  if (!c) return;
  if (c.ws) { c.ws.onclose = null; c.ws.close(); }
  if (c.mic) c.mic.getTracks().forEach((t) => t.stop());
  if (c.ctx) c.ctx.close();
  renderStats();
  if (stats.state !== "error") setStatus("idle");
}

async function init() {
  const params = new URLSearchParams(location.search);
  try {
    const reply = await fetch(withToken("api/info"));
    if (!reply.ok) throw new Error((await reply.text()).trim());
    const info = await reply.json();
    for (const v of info.voices) $("voice").add(new Option(v, v));
  } catch (e) {
    fail(`cannot reach the server: ${e.message}`);
  }
  if (params.has("voice")) $("voice").value = params.get("voice");
  if (params.has("prompt")) $("prompt").value = params.get("prompt");
  $("toggle").onclick = () => (conn ? stop() : start());
  renderStats();
  if (params.has("autostart")) start();
}

init();
