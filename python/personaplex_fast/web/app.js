// The page's half of a conversation over /api/chat, PersonaPlex's own protocol (api_chat.py):
// voice and prompt in the URL, the handshake byte once they have run, then Ogg-Opus both ways
// and the transcript in. Opus is the browser's (WebCodecs); ogg.js frames its packets.
// URL parameters ?voice=NAME&prompt=TEXT preselect the pickers; ?autostart starts at load;
// ?token=T is passed on to the server (serve --token).
//
// Without headphones the microphone hears the model: the page asks the browser for its echo
// cancellation (with noise suppression and auto gain) and shows what the browser applied, and
// the round trip it measures: the 80 ms frame, network + server (from sending a frame to the
// model frame of the tick that took it), the playback queue and the output device.

"use strict";

const KIND = { HANDSHAKE: 0, AUDIO: 1, TEXT: 2, ERROR: 5 };
const RATE = 24000, FRAME = 1920;
const PACKET_US = 20000; // Opus frames of 20 ms, four to a page: one page per 80 ms frame
// Unsent bytes past which a microphone frame is skipped rather than queued (~1 s of Opus).
const BACKLOG_BYTES = 4096;
const AUDIBLE = 1e-3; // a frame peaking above this is counted as sound, not silence

// Counters for the stats line, also read by the browser test (window.personaplex).
const stats = { state: "idle", rate: 0, captured: 0, heard: 0, sent: 0, received: 0, audible: 0, tokens: 0, text: "", error: "",
  bytesOut: 0, bytesIn: 0, processing: {}, latency: null };
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
  const kbps = (bytes, frames) => (frames ? Math.round(bytes * 8 / (frames * 80)) : 0);
  $("stats").textContent = `audio at ${stats.rate} Hz; sent ${stats.sent} frames (${stats.heard} audible, Opus `
    + `${kbps(stats.bytesOut, stats.sent)} kbit/s), received ${stats.received} `
    + `(${stats.audible} audible, ${kbps(stats.bytesIn, stats.received)} kbit/s), ${stats.tokens} text tokens`
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

function packet(kind, bytes) {
  const out = new Uint8Array(1 + bytes.length);
  out[0] = kind;
  out.set(bytes, 1);
  return out;
}

// The browser's decoder gives 48 kHz whatever the stream's rate; the worklet plays 24 kHz.
// Linear interpolation after a moving average, as the worklet's capture does: Opus at
// 24 kHz keeps nothing above 12 kHz to alias.
function resample(x, from) {
  if (from === RATE) return x;
  const step = from / RATE, taps = Math.max(1, Math.round(step));
  const y = new Float32Array(Math.floor(x.length / step));
  for (let j = 0; j < y.length; j++) {
    const t = j * step, i = Math.floor(t);
    let sum = 0;
    for (let k = 0; k < taps; k++) sum += x[Math.min(x.length - 1, i + k)];
    y[j] = sum / taps;
  }
  return y;
}

function startCodecs(c) {
  c.encoder = new AudioEncoder({
    output: (chunk, meta) => onPacket(c, chunk, meta),
    error: (e) => { stop(); fail(`Opus encoder: ${e.message || e}`); },
  });
  c.encoder.configure({ codec: "opus", sampleRate: RATE, numberOfChannels: 1, bitrate: 32000,
    opus: { frameDuration: PACKET_US } });
  c.decoder = new AudioDecoder({
    output: (data) => onDecoded(c, data),
    error: (e) => { stop(); fail(`Opus decoder: ${e.message || e}`); },
  });
  c.oggIn = new OggReader();
  c.packets = [];
  c.encoded = 0; // frames handed to the encoder
  c.capturedAt = []; // their capture times, until their page goes out
  c.decodedTail = 0; // samples of the current 80 ms frame decoded so far
  c.decodedPeak = 0;
}

// The OpusHead the browser's encoder describes, or one of our own (RFC 7845 5.1).
function opusHead(meta) {
  const d = meta && meta.decoderConfig && meta.decoderConfig.description;
  if (d && d.byteLength >= 19) return new Uint8Array(d instanceof ArrayBuffer ? d : d.buffer).slice();
  const head = new Uint8Array(19);
  head.set(ascii("OpusHead"));
  const v = new DataView(head.buffer);
  head[8] = 1;
  head[9] = 1;
  v.setUint16(10, 312, true);
  v.setUint32(12, RATE, true);
  return head;
}

function onPacket(c, chunk, meta) {
  if (conn !== c) return;
  if (!c.oggOut) c.oggOut = new OggWriter(opusHead(meta));
  const data = new Uint8Array(chunk.byteLength);
  chunk.copyTo(data);
  c.packets.push({ data, samples48k: Math.round((chunk.duration || PACKET_US) * 48 / 1000) });
  if (c.packets.reduce((a, p) => a + p.samples48k, 0) < 48 * 80) return;
  const pages = (c.oggOut.seq === 0 ? c.oggOut.headers() : []).concat([c.oggOut.page(c.packets)]);
  c.packets = [];
  const bytes = new Uint8Array(pages.reduce((a, p) => a + p.length, 0));
  let at = 0;
  for (const p of pages) { bytes.set(p, at); at += p.length; }
  if (c.ws.readyState !== WebSocket.OPEN) return;
  c.ws.send(packet(KIND.AUDIO, bytes));
  stats.bytesOut += bytes.length;
  remember(c.sends, [stats.sent, c.capturedAt.shift()], 200);
  stats.sent++;
}

function onDecoded(c, data) {
  if (conn !== c) { data.close(); return; }
  const raw = new Float32Array(data.numberOfFrames);
  data.copyTo(raw, { planeIndex: 0, format: "f32-planar" });
  const rate = data.sampleRate;
  data.close();
  const pcm = resample(raw, rate);
  const p = peak(pcm);
  $("model-level").value = Math.min(1, p * 2);
  // Counted per 80 ms of decoded audio, as frames were before Opus.
  c.decodedPeak = Math.max(c.decodedPeak, p);
  c.decodedTail += pcm.length;
  while (c.decodedTail >= FRAME) {
    c.decodedTail -= FRAME;
    if (c.decodedPeak > AUDIBLE) stats.audible++;
    c.decodedPeak = 0;
  }
  c.node.port.postMessage(pcm, [pcm.buffer]);
}

async function start() {
  setStatus("connecting", "starting audio…");
  $("transcript").textContent = "";
  Object.assign(stats, { captured: 0, heard: 0, sent: 0, received: 0, audible: 0, tokens: 0, text: "", error: "",
    bytesOut: 0, bytesIn: 0, processing: {}, latency: null });
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
    if (typeof AudioEncoder === "undefined") throw new Error("this browser has no WebCodecs Opus (open the page over https or on localhost)");
    startCodecs(c);
  } catch (e) {
    stop();
    return fail(`audio: ${e.message || e}`);
  }
  c.node.port.onmessage = (e) => (e.data instanceof Float32Array ? onMicFrame(c, e.data) : onPlayback(c, e.data));
  // The worklet's playback queue, asked for twice a second (it answers only when asked).
  c.poll = setInterval(() => { c.node.port.postMessage("queue"); measureLatency(c); renderStats(); }, 500);
  c.node.onprocessorerror = () => { stop(); fail("the audio worklet stopped (see the console)"); };
  const url = withToken("api/chat");
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  c.voice = $("voice").value;
  c.prompt = $("prompt").value.trim();
  url.searchParams.set("voice_prompt", c.voice ? c.voice + ".pt" : "");
  url.searchParams.set("text_prompt", c.prompt);
  c.ws = new WebSocket(url);
  c.ws.binaryType = "arraybuffer";
  c.ws.onopen = () => setStatus("connecting", "preparing the session…");
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
  // Before the handshake the server is not listening yet; with a backed-up socket the
  // frame would arrive too late to be useful (skipped before encoding: the stream stays whole).
  if (!c.ready || c.ws.readyState !== WebSocket.OPEN || c.ws.bufferedAmount > BACKLOG_BYTES) return;
  c.capturedAt.push(performance.now());
  c.encoder.encode(new AudioData({ format: "f32", sampleRate: RATE, numberOfFrames: FRAME, numberOfChannels: 1,
    timestamp: c.encoded++ * 80000, data: frame }));
}

function onPlayback(c, msg) {
  remember(c.playback, 1000 * msg.queued / RATE, 10);
}

function onMessage(c, data) {
  const kind = data[0], body = data.subarray(1);
  if (kind === KIND.AUDIO) {
    remember(c.replies, [stats.received, performance.now()], 60);
    stats.received++;
    stats.bytesIn += body.length;
    for (const p of c.oggIn.packets(body)) {
      if (p.head) {
        c.decoder.configure({ codec: "opus", sampleRate: RATE, numberOfChannels: 1, description: p.data });
        c.decodedUs = 0;
      } else if (!p.tags && c.decoder.state === "configured") {
        c.decoder.decode(new EncodedAudioChunk({ type: "key", timestamp: c.decodedUs, data: p.data }));
        c.decodedUs += PACKET_US; // an order for the decoder only: the packets hold their durations
      }
    }
    if (stats.received % 5 === 0) renderStats();
  } else if (kind === KIND.HANDSHAKE) {
    c.ready = true;
    setStatus("live", `live${c.voice ? " · voice " + c.voice : ""}${c.prompt ? " · prompted" : ""}`);
  } else if (kind === KIND.TEXT) {
    const text = new TextDecoder().decode(body);
    stats.tokens++;
    stats.text += text;
    const t = $("transcript");
    t.textContent += text;
    t.scrollTop = t.scrollHeight;
  } else if (kind === KIND.ERROR) {
    fail(new TextDecoder().decode(body));
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
  for (const codec of [c.encoder, c.decoder]) if (codec && codec.state !== "closed") codec.close();
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
