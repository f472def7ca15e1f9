// The page's media inputs: the microphone (an AudioWorklet that hands over 24 kHz PCM16 chunks) and the
// camera (a preview <video> and JPEG snapshots from a canvas).

export class Microphone {
  /** `ctx`: the page's AudioContext; `onChunk(Int16Array)`: every `chunkMs` of 24 kHz PCM16. */
  constructor(ctx, { onChunk, chunkMs = 40 }) {
    this.ctx = ctx;
    this.onChunk = onChunk;
    this.chunkMs = chunkMs;
    this.stream = null;
    this.node = null;
    this.source = null;
    this.muted = false;
  }

  async start() {
    // Echo cancellation matters for barge-in: without it the assistant's own voice, picked up by the
    // microphone, would interrupt it.
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    await this.ctx.audioWorklet.addModule(new URL("./mic-worklet.js", import.meta.url));
    this.source = this.ctx.createMediaStreamSource(this.stream);
    this.node = new AudioWorkletNode(this.ctx, "pcm16-capture", {
      numberOfInputs: 1,
      numberOfOutputs: 0,
      channelCount: 1,
      channelCountMode: "explicit",
      processorOptions: { chunkMs: this.chunkMs },
    });
    this.node.port.onmessage = (e) => this.onChunk(new Int16Array(e.data));
    this.source.connect(this.node);
    this.setMuted(this.muted);
  }

  /** Muted, the worklet sends silence (so the server's VAD hears any utterance end). */
  setMuted(muted) {
    this.muted = muted;
    if (this.node) this.node.port.postMessage({ muted });
  }

  stop() {
    if (this.source) this.source.disconnect();
    if (this.node) {
      this.node.port.onmessage = null;
      this.node.disconnect();
    }
    if (this.stream) for (const track of this.stream.getTracks()) track.stop();
    this.stream = this.node = this.source = null;
  }
}

export class Camera {
  /** `video`: the preview element. */
  constructor(video) {
    this.video = video;
    this.stream = null;
  }

  get running() {
    return this.stream !== null;
  }

  async start() {
    this.stream = await navigator.mediaDevices.getUserMedia({
      video: { width: { ideal: 640 }, height: { ideal: 480 } },
    });
    this.video.srcObject = this.stream;
    await this.video.play();
  }

  stop() {
    if (this.stream) for (const track of this.stream.getTracks()) track.stop();
    this.video.srcObject = null;
    this.stream = null;
  }

  /** The current frame as a JPEG data: URL, at most `maxSide` pixels on its longer side; null before the
   * first frame. */
  snapshot({ maxSide = 640, quality = 0.85 } = {}) {
    const { videoWidth: w, videoHeight: h } = this.video;
    if (!this.running || !w || !h) return null;
    const scale = Math.min(1, maxSide / Math.max(w, h));
    const canvas = document.createElement("canvas");
    canvas.width = Math.round(w * scale);
    canvas.height = Math.round(h * scale);
    canvas.getContext("2d").drawImage(this.video, 0, 0, canvas.width, canvas.height);
    return canvas.toDataURL("image/jpeg", quality);
  }
}
