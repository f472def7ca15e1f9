// Streamed playback of reply audio (24 kHz PCM16 chunks) through Web Audio, and how much of each
// assistant item was actually played — what `conversation.item.truncate` reports after a barge-in.
//
// Chunks are scheduled back to back on the AudioContext's clock (one AudioBufferSourceNode each; Web Audio
// resamples 24 kHz buffers to the context's rate). A chunk that arrives after the previous one has ended
// (the server was slower than real time) starts a little after "now", so a stall is a short gap, not a
// glitch. Played time is counted per chunk from the clock, so gaps are not counted as played audio.

export const WIRE_RATE = 24000;
const START_LEAD_S = 0.03; // schedule a chunk this far ahead when the queue has run dry

class ItemPlayback {
  constructor(itemId) {
    this.itemId = itemId;
    this.chunks = []; // {source, start, duration} in AudioContext seconds
    this.receivedMs = 0; // audio received for the item
    this.stoppedAt = null; // context time at which playback was cut (null: not cut)
  }

  /** Milliseconds of this item's audio played by context time `now`. */
  playedMs(now) {
    const t = this.stoppedAt === null ? now : Math.min(now, this.stoppedAt);
    let played = 0;
    for (const c of this.chunks) played += Math.max(0, Math.min(t - c.start, c.duration));
    return played * 1000;
  }

  /** Context time at which the last scheduled chunk ends. */
  end() {
    const last = this.chunks[this.chunks.length - 1];
    return last ? last.start + last.duration : 0;
  }
}

export class AudioPlayer {
  /** `ctx`: a running AudioContext. `onFirstPlay(itemId, wallMs)`: called once per item, with the
   * performance.now() time at which its first chunk will be heard. `onChunkPlayed(itemId, ms)`: a chunk
   * played to its end (not cut). */
  constructor(ctx, { onFirstPlay = () => {}, onChunkPlayed = () => {} } = {}) {
    this.ctx = ctx;
    this.out = ctx.createGain();
    this.out.connect(ctx.destination);
    this.onFirstPlay = onFirstPlay;
    this.onChunkPlayed = onChunkPlayed;
    this.items = new Map(); // itemId -> ItemPlayback
    this.current = null; // the ItemPlayback being played (the latest one that got audio)
    this.nextStart = 0;
  }

  /** Context time "now" as heard: minus the output latency when the browser reports it. */
  heardNow() {
    return Math.max(0, this.ctx.currentTime - (this.ctx.outputLatency || 0));
  }

  /** Queue one chunk (Int16Array at 24 kHz) of `itemId`'s audio. */
  enqueue(itemId, pcm16) {
    let item = this.items.get(itemId);
    if (!item) {
      item = new ItemPlayback(itemId);
      this.items.set(itemId, item);
    }
    item.receivedMs += (pcm16.length * 1000) / WIRE_RATE;
    if (item.stoppedAt !== null || pcm16.length === 0) return; // cut by a barge-in: drop the rest
    this.current = item;
    const buffer = this.ctx.createBuffer(1, pcm16.length, WIRE_RATE);
    const data = buffer.getChannelData(0);
    for (let i = 0; i < pcm16.length; i++) data[i] = pcm16[i] / 32768;
    const source = this.ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(this.out);
    const now = this.ctx.currentTime;
    const start = Math.max(this.nextStart, now + START_LEAD_S);
    source.start(start);
    this.nextStart = start + buffer.duration;
    if (item.chunks.length === 0) {
      const wall = performance.now() + (start - now + (this.ctx.outputLatency || 0)) * 1000;
      this.onFirstPlay(itemId, wall);
    }
    const chunk = { source, start, duration: buffer.duration };
    item.chunks.push(chunk);
    source.onended = () => {
      chunk.source = null; // keep the timing, release the node
      this.onChunkPlayed(itemId, chunk.duration * 1000);
    };
  }

  /** Is audio of `itemId` still sounding or queued? */
  isPlaying(itemId) {
    const item = this.items.get(itemId);
    return Boolean(item) && item.stoppedAt === null && item.end() > this.heardNow();
  }

  playedMs(itemId) {
    const item = this.items.get(itemId);
    return item ? item.playedMs(this.heardNow()) : 0;
  }

  receivedMs(itemId) {
    const item = this.items.get(itemId);
    return item ? item.receivedMs : 0;
  }

  /** The item whose audio was played last (an item id), or null. */
  currentItem() {
    return this.current ? this.current.itemId : null;
  }

  /** Stop `itemId` now and drop its queued audio (and any it receives later). Returns
   * {itemId, playedMs, receivedMs, wasPlaying}, or null for an item that got no audio. */
  stop(itemId) {
    const item = this.items.get(itemId);
    if (!item) return null;
    const now = this.heardNow();
    const wasPlaying = item.stoppedAt === null && item.end() > now;
    if (item.stoppedAt === null) item.stoppedAt = now;
    for (const c of item.chunks) {
      if (c.source) {
        c.source.onended = null;
        try {
          c.source.stop();
        } catch {
          /* already stopped */
        }
        c.source.disconnect();
        c.source = null;
      }
    }
    if (this.current === item) this.nextStart = 0;
    return { itemId, playedMs: item.playedMs(now), receivedMs: item.receivedMs, wasPlaying };
  }

  /** Forget everything (disconnect). */
  reset() {
    for (const itemId of this.items.keys()) this.stop(itemId);
    this.items.clear();
    this.current = null;
    this.nextStart = 0;
  }
}
