// A minimal OpenAI Realtime (GA) client over a browser WebSocket: connect, send client events, dispatch
// server events by type.
//
// Browsers cannot set headers on a WebSocket, so an API key travels as the subprotocol
// `openai-insecure-api-key.<KEY>` beside `realtime` (what OpenAI's own browser clients send); the gateway
// accepts `realtime`. A refused key fails the upgrade (HTTP 401), which a browser reports only as a close
// with code 1006 — `onclose` gets {code, reason, opened} to tell that apart from a dropped session.

export class RealtimeClient {
  constructor({ url, apiKey = "", onEvent = () => {}, onOpen = () => {}, onClose = () => {} }) {
    this.url = url;
    this.apiKey = apiKey.trim();
    this.onEvent = onEvent;
    this.onOpen = onOpen;
    this.onClose = onClose;
    this.ws = null;
    this.opened = false;
    this.counter = 0;
  }

  connect() {
    const protocols = ["realtime"];
    if (this.apiKey) protocols.push(`openai-insecure-api-key.${this.apiKey}`);
    this.ws = new WebSocket(this.url, protocols);
    this.ws.onopen = () => {
      this.opened = true;
      this.onOpen();
    };
    this.ws.onmessage = (message) => {
      let event;
      try {
        event = JSON.parse(message.data);
      } catch {
        return; // not JSON: not a Realtime event
      }
      this.onEvent(event);
    };
    this.ws.onclose = (e) => {
      const opened = this.opened;
      this.ws = null;
      this.opened = false;
      this.onClose({ code: e.code, reason: e.reason, opened });
    };
  }

  get connected() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  /** Send one client event; returns its event_id (or null when not connected). */
  send(type, fields = {}) {
    if (!this.connected) return null;
    this.counter += 1;
    const eventId = `evt_page_${Date.now().toString(36)}_${this.counter}`;
    this.ws.send(JSON.stringify({ type, event_id: eventId, ...fields }));
    return eventId;
  }

  close() {
    if (this.ws) this.ws.close(1000, "client disconnect");
  }
}

/** ws(s)://<this host>/v1/realtime?model=M */
export function realtimeUrl(model) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/v1/realtime?model=${encodeURIComponent(model)}`;
}

/** Int16Array -> base64 (little-endian bytes, as typed arrays are on every browser platform). */
export function pcm16ToBase64(samples) {
  const bytes = new Uint8Array(samples.buffer, samples.byteOffset, samples.byteLength);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

/** base64 -> Int16Array (a copy, aligned). */
export function base64ToPcm16(b64) {
  const binary = atob(b64);
  const samples = new Int16Array(binary.length >> 1);
  const bytes = new Uint8Array(samples.buffer);
  for (let i = 0; i < bytes.length; i++) bytes[i] = binary.charCodeAt(i);
  return samples;
}
