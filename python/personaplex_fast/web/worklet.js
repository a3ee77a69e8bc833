// The audio thread's half of a conversation: microphone at the context's rate (usually
// 48 kHz) -> 24 kHz frames of 1920 samples posted to the page, and the page's 24 kHz
// model frames -> the speaker at the context's rate. Resampling is linear interpolation,
// with a moving average before decimation as a cheap anti-alias filter: plenty for
// speech through a codec that keeps nothing above 12 kHz anyway.

class Duplex extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { rate, frameSize, prebufferFrames } = options.processorOptions;
    // capture: `t` is the next output sample's time in input samples, counted from the
    // current block's first sample (-1 is the previous block's last one, kept in `prev`)
    this.step = sampleRate / rate;
    this.t = 0;
    this.prev = 0;
    this.taps = new Float32Array(Math.max(1, Math.round(this.step)));
    this.tap = 0;
    this.tapSum = 0;
    this.frameSize = frameSize;
    this.frame = new Float32Array(frameSize);
    this.fill = 0;
    // playback: a ring of 24 kHz samples read at a fractional position
    this.ring = new Float32Array(rate); // 1 s: more backlog than that is dropped
    this.written = 0;
    this.read = 0;
    this.playStep = rate / sampleRate;
    this.prebuffer = prebufferFrames * frameSize;
    this.playing = false;
    this.underruns = 0;
    // Frames to play; the string "queue" asks how many samples wait to be played.
    this.port.onmessage = (e) => (e.data === "queue"
      ? this.port.postMessage({ queued: Math.max(0, this.written - this.read) }) : this.enqueue(e.data));
  }

  enqueue(frame) {
    const n = this.ring.length;
    for (let i = 0; i < frame.length; i++) this.ring[(this.written + i) % n] = frame[i];
    this.written += frame.length;
    if (this.written - this.read > n - 1) this.read = this.written - n + 1;
  }

  capture(x) {
    const k = this.taps.length;
    const y = new Float32Array(x.length);
    for (let i = 0; i < x.length; i++) {
      this.tapSum += x[i] - this.taps[this.tap];
      this.taps[this.tap] = x[i];
      this.tap = (this.tap + 1) % k;
      y[i] = this.tapSum / k;
    }
    while (this.t < y.length - 1) {
      const i = Math.floor(this.t), f = this.t - i;
      const a = i < 0 ? this.prev : y[i];
      this.frame[this.fill++] = a + (y[i + 1] - a) * f;
      if (this.fill === this.frameSize) {
        this.port.postMessage(this.frame, [this.frame.buffer]); // detaches this.frame
        this.frame = new Float32Array(this.frameSize);
        this.fill = 0;
      }
      this.t += this.step;
    }
    this.t -= y.length;
    this.prev = y[y.length - 1];
  }

  play(out) {
    const n = this.ring.length;
    for (let j = 0; j < out.length; j++) {
      if (!this.playing && this.written - this.read >= this.prebuffer) this.playing = true;
      if (this.playing && this.read + 1 >= this.written) {
        this.playing = false; // ran dry: rebuffer rather than stutter sample by sample
        this.underruns++;
      }
      if (!this.playing) { out[j] = 0; continue; }
      const i = Math.floor(this.read), f = this.read - i;
      const a = this.ring[i % n];
      out[j] = a + (this.ring[(i + 1) % n] - a) * f;
      this.read += this.playStep;
    }
  }

  process(inputs, outputs) {
    const mic = inputs[0] && inputs[0][0];
    if (mic && mic.length) this.capture(mic);
    const out = outputs[0];
    if (out && out[0]) {
      this.play(out[0]);
      for (let c = 1; c < out.length; c++) out[c].set(out[0]);
    }
    return true;
  }
}

registerProcessor("duplex", Duplex);
