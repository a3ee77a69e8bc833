// The page's half of a conversation: the session-start message, microphone frames out,
// model frames and transcript in. The wire format is documented at the top of server.py.
// URL parameters ?voice=NAME&prompt=TEXT preselect the pickers; ?autostart starts at load;
// ?token=T is passed on to the server (serve --token).
//
// Without headphones the microphone hears the model: the page asks the browser for its echo
// cancellation (with noise suppression and auto gain) and shows what the browser applied, and
// the round trip it measures: the 80 ms frame, network + server (from sending a frame to the
// model frame of the tick that took it), the playback queue and the output device.

"use strict";

const KIND = { START: 0, AUDIO: 1, TEXT: 2, ERROR: 3 };
const RATE = 24000, FRAME = 1920;
const AUDIBLE = 1e-3; // a frame peaking above this is counted as sound, not silence

// Counters for the stats line, also read by the browser test (window.personaplex).
const stats = { state: "idle", rate: 0, captured: 0, heard: 0, sent: 0, received: 0, audible: 0, tokens: 0, text: "", error: "",
  processing: {}, latency: null };
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
  const p = stats.processing, on = (x) => (x ? "on" : "off");
  const l = stats.latency;
  $("stats").textContent = `audio at ${stats.rate} Hz; sent ${stats.sent} frames (${stats.heard} audible), `
    + `received ${stats.received} `
    + `(${stats.audible} audible), ${stats.tokens} text tokens`
    + (stats.rate ? `; browser echo cancellation ${on(p.echoCancellation)}, noise suppression `
      + `${on(p.noiseSuppression)}, auto gain ${on(p.autoGainControl)}` : "");
  $("latency").textContent = l ? `round trip ${l.total} ms = frame ${l.frame} + network & server ${l.server} `
    + `+ playback ${l.playback} + devices ${l.devices}` : "";
}

const median = (xs) => [...xs].sort((a, b) => a - b)[xs.length >> 1];

// Network & server: from sending a frame to the arrival of the model frame of the tick that
// took it. The server takes one frame per tick in order, so reply k answers our frame k - late,
// `late` being the ticks it ran on silence because none of our frames had reached it. It ticks
// on an 80 ms grid: tick k began no later than base + 80 k, base the earliest reply time less
// 80 ms per reply, so it cannot have taken a frame sent after that. The largest `late` this
// allows over the last replies is the one used; it misses a tick run on silence only when our
// frame was sent in the few ms between that tick's start and the earliest a reply ever came.
function measureLatency(c) {
  if (c.replies.length < 10 || !c.playback.length) return;
  const base = Math.min(...c.replies.map(([k, t]) => t - 80 * k));
  let late = 0;
  for (const [k] of c.replies) {
    const began = base + 80 * k;
    const before = c.sends.filter(([, t]) => t < began);
    late = Math.max(late, k - (before.length ? before[before.length - 1][0] : -1));
  }
  const sentAt = new Map(c.sends);
  const server = c.replies.filter(([k]) => sentAt.has(k - late)).map(([k, t]) => t - sentAt.get(k - late));
  if (!server.length) return;
  const devices = 1000 * ((c.ctx.baseLatency || 0) + (c.ctx.outputLatency || 0) + (c.inputLatency || 0));
  const parts = { frame: 80, server: median(server), playback: median(c.playback), devices };
  for (const key in parts) parts[key] = Math.round(parts[key]);
  stats.latency = { ...parts, total: parts.frame + parts.server + parts.playback + parts.devices, late };
}

const remember = (list, item, most) => { list.push(item); if (list.length > most) list.shift(); };

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
  Object.assign(stats, { captured: 0, heard: 0, sent: 0, received: 0, audible: 0, tokens: 0, text: "", error: "",
    processing: {}, latency: null });
  const c = conn = { ready: false, sends: [], replies: [], playback: [] }; // [frame index, performance.now()]
  try {
    // Asked for explicitly: defaults differ between browsers, and without headphones the
    // model would otherwise hear itself.
    c.mic = await navigator.mediaDevices.getUserMedia(
      { audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true } });
    const applied = c.mic.getAudioTracks()[0].getSettings();
    stats.processing = { echoCancellation: !!applied.echoCancellation, noiseSuppression: !!applied.noiseSuppression,
      autoGainControl: !!applied.autoGainControl };
    c.inputLatency = applied.latency;
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
  c.node.port.onmessage = (e) => (e.data instanceof Float32Array ? onMicFrame(c, e.data) : onPlayback(c, e.data));
  // The worklet's playback queue, asked for twice a second (it answers only when asked).
  c.poll = setInterval(() => { c.node.port.postMessage("queue"); measureLatency(c); renderStats(); }, 500);
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
  remember(c.sends, [stats.sent, performance.now()], 200);
  stats.sent++;
}

function onPlayback(c, msg) {
  remember(c.playback, 1000 * msg.queued / RATE, 10);
}

function onMessage(c, data) {
  const kind = data[0], body = data.subarray(1);
  if (kind === KIND.AUDIO) {
    remember(c.replies, [stats.received, performance.now()], 60);
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
  clearInterval(c.poll);
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
