// The microphone's AudioWorklet: input at the AudioContext's rate (usually 48 kHz) -> 24 kHz mono PCM16,
// posted to the page in chunks of `chunkMs` (an ArrayBuffer of little-endian int16 per message). Muted,
// it posts silence, so the server's VAD still hears an utterance end.
//
// Resampling is a streaming windowed-sinc interpolator: each output sample is a Hann-windowed sinc
// low-pass (cut-off just under the lower Nyquist rate, so 48 -> 24 kHz does not alias) evaluated at the
// output instant, over a small ring of past input. It keeps its phase across render quanta, so chunk
// boundaries add no clicks. Runs on the audio rendering thread: no allocation per quantum.

const OUT_RATE = 24000;
const HALF_TAPS = 16; // input samples on each side of the output instant (at the input rate)
const TABLE_STEPS = 512; // kernel resolution: values per input sample

class Pcm16Capture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.ratio = sampleRate / OUT_RATE; // input samples per output sample
    this.cutoff = Math.min(1, 1 / this.ratio) * 0.92; // normalised to the input Nyquist rate
    this.half = Math.ceil(HALF_TAPS * Math.max(1, this.ratio));
    this.table = this.buildTable();
    this.ring = new Float32Array(4096); // power of two, far more than 2 * half + a render quantum
    this.mask = this.ring.length - 1;
    this.written = 0; // input samples written to the ring so far
    this.pos = 0; // the next output instant, in input samples since the start
    this.chunk = new Int16Array(Math.round((OUT_RATE * (opts.chunkMs || 40)) / 1000));
    this.filled = 0;
    this.muted = false;
    this.port.onmessage = (e) => {
      if (e.data && typeof e.data.muted === "boolean") this.muted = e.data.muted;
    };
  }

  // The kernel, tabulated once: value at distance x (input samples) is table[round(|x| * STEPS)].
  buildTable() {
    const n = this.half * TABLE_STEPS + 1;
    const table = new Float32Array(n + 1);
    for (let i = 0; i < n; i++) {
      const x = i / TABLE_STEPS;
      const w = 0.5 + 0.5 * Math.cos((Math.PI * x) / this.half);
      const t = Math.PI * this.cutoff * x;
      table[i] = this.cutoff * w * (t === 0 ? 1 : Math.sin(t) / t);
    }
    return table; // table[n] stays 0: the window's edge
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0) return true;
    const channel = input[0]; // mono: the first channel
    for (let i = 0; i < channel.length; i++) this.ring[(this.written + i) & this.mask] = channel[i];
    this.written += channel.length;
    // An output instant needs `half` input samples after it.
    while (this.pos + this.half < this.written) {
      const centre = Math.floor(this.pos);
      let acc = 0;
      for (let k = centre - this.half + 1; k <= centre + this.half; k++) {
        if (k < 0) continue;
        const d = Math.round(Math.abs(this.pos - k) * TABLE_STEPS);
        if (d < this.table.length) acc += this.ring[k & this.mask] * this.table[d];
      }
      const s = Math.max(-1, Math.min(1, acc));
      this.chunk[this.filled++] = this.muted ? 0 : Math.round(s < 0 ? s * 32768 : s * 32767);
      this.pos += this.ratio;
      if (this.filled === this.chunk.length) {
        const out = this.chunk.slice(0);
        this.port.postMessage(out.buffer, [out.buffer]);
        this.filled = 0;
      }
    }
    return true;
  }
}

registerProcessor("pcm16-capture", Pcm16Capture);
