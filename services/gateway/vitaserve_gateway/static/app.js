// The page: connect to the gateway's Realtime WebSocket, stream the microphone, play the reply, handle
// barge-in, show the conversation and the latency.
//
// Turns: the server's VAD (server_vad) ends each spoken question and starts the reply by itself; a typed
// question is conversation.item.create (input_text) + response.create; a camera snapshot is
// conversation.item.create (input_image) and goes with the next question, spoken or typed.
//
// Barge-in: on input_audio_buffer.speech_started while a reply is playing (or still being generated),
// playback stops at once, queued audio is dropped (and any more of that reply), and
// conversation.item.truncate reports how much of the reply was heard, so the server's history holds only
// that. The server cancels the reply itself once the speech meets its barge-in policy (response.done with
// status "cancelled").
//
// `window.vitaserveState` is the page's state as plain data, for tests and debugging.

import { AudioPlayer } from "./player.js";
import { Camera, Microphone } from "./media.js";
import { RealtimeClient, base64ToPcm16, pcm16ToBase64, realtimeUrl } from "./realtime.js";

const $ = (id) => document.getElementById(id);

const state = {
  connected: false,
  status: "Disconnected",
  sessionId: null,
  audioChunksSent: 0,
  speechStarted: 0,
  speechStopped: 0,
  audioDeltas: 0,
  audioMsReceived: 0,
  audioChunksPlayed: 0,
  audioMsPlayed: 0,
  responsesCreated: 0,
  responsesDone: 0,
  responses: [], // {id, itemId, status, reason, latencyMs}
  transcript: [], // {itemId, role, kind, text, status, latencyMs, heard, truncatedMs}
  latenciesMs: [],
  lastLatencyMs: null,
  medianLatencyMs: null,
  truncatesSent: [], // {item_id, audio_end_ms, received_ms}
  truncated: [], // conversation.item.truncated: {item_id, audio_end_ms}
  snapshotsSent: 0,
  errors: [], // {type, code, message}
  events: {}, // server event type -> count
};
window.vitaserveState = state;

let ctx = null; // one AudioContext for the microphone and playback, made on the first click
let client = null;
let mic = null;
let player = null;
let turnMark = null; // performance.now() of the latest speech end / typed response.create
let createAfterDone = false; // a typed question waits for the running response to end
let hearing = false; // between speech_started and speech_stopped
const responses = new Map(); // response id -> the state.responses row
const marks = new Map(); // response id -> performance.now() its latency counts from
const itemResponse = new Map(); // assistant item id -> response row
const entries = new Map(); // item id -> {data, li}
const snapshots = new Map(); // item id -> data URL (the server does not echo image data)
const camera = new Camera($("preview"));

// ---- status, errors, latency ---------------------------------------------------------------

function setStatus(text, kind) {
  state.status = text;
  $("status-text").textContent = text;
  $("status").dataset.state = kind;
}

function showError(message, detail = "") {
  const box = document.createElement("div");
  box.className = "error";
  const text = document.createElement("p");
  text.textContent = message;
  if (detail) {
    const small = document.createElement("span");
    small.className = "code";
    small.textContent = ` (${detail})`;
    text.append(small);
  }
  const close = document.createElement("button");
  close.type = "button";
  close.className = "link";
  close.textContent = "Dismiss";
  close.setAttribute("aria-label", `Dismiss: ${message}`);
  close.addEventListener("click", () => box.remove());
  box.append(text, close);
  $("errors").append(box);
  while ($("errors").children.length > 4) $("errors").firstElementChild.remove();
}

function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

const fmtMs = (ms) => (ms >= 1000 ? `${(ms / 1000).toFixed(ms >= 10000 ? 1 : 2)} s` : `${Math.round(ms)} ms`);

function recordLatency(response, ms) {
  response.latencyMs = Math.round(ms);
  state.lastLatencyMs = response.latencyMs;
  state.latenciesMs.push(response.latencyMs);
  state.medianLatencyMs = Math.round(median(state.latenciesMs));
  $("latency-last").textContent = fmtMs(state.lastLatencyMs);
  $("latency-median").textContent = fmtMs(state.medianLatencyMs);
  $("latency-count").textContent = String(state.latenciesMs.length);
  const entry = entries.get(response.itemId);
  if (entry) {
    entry.data.latencyMs = response.latencyMs;
    render(entry);
  }
}

// ---- the transcript ------------------------------------------------------------------------

function addEntry(itemId, role, kind, text, status) {
  if (entries.has(itemId)) return entries.get(itemId);
  $("transcript-empty")?.remove();
  const data = { itemId, role, kind, text, status, latencyMs: null, heard: null, truncatedMs: null };
  state.transcript.push(data);
  const li = document.createElement("li");
  li.className = `entry ${role}`;
  const head = document.createElement("p");
  head.className = "who";
  const body = document.createElement("div");
  body.className = "text";
  li.append(head, body);
  const entry = { data, li, head, body };
  entries.set(itemId, entry);
  render(entry);
  $("transcript").append(li);
  li.scrollIntoView({ block: "end", behavior: "smooth" });
  return entry;
}

const STATUS_LABEL = {
  transcribing: "transcribing…",
  speaking: "speaking…",
  cancelled: "interrupted",
  failed: "failed",
  removed: "removed",
};

function render({ data, li, head, body }) {
  const who = data.role === "user" ? "You" : "Assistant";
  const mode = data.kind === "audio" ? " · spoken" : data.kind === "image" ? " · snapshot" : "";
  head.replaceChildren();
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = who + mode;
  head.append(name);
  const badges = [];
  if (STATUS_LABEL[data.status]) badges.push([STATUS_LABEL[data.status], data.status]);
  if (data.truncatedMs !== null) badges.push([`heard ${(data.truncatedMs / 1000).toFixed(1)} s`, "truncated"]);
  if (data.latencyMs !== null) badges.push([`first audio after ${fmtMs(data.latencyMs)}`, "latency"]);
  for (const [label, kind] of badges) {
    const badge = document.createElement("span");
    badge.className = `badge badge-${kind}`;
    badge.textContent = label;
    head.append(badge);
  }
  li.dataset.status = data.status;
  li.setAttribute("aria-busy", data.status === "speaking" || data.status === "transcribing" ? "true" : "false");
  body.replaceChildren();
  if (data.kind === "image") {
    const url = snapshots.get(data.itemId);
    if (url) {
      const img = document.createElement("img");
      img.src = url;
      img.alt = "Camera snapshot sent with the question";
      img.className = "thumb";
      body.append(img);
    } else {
      body.textContent = "[image]";
    }
    return;
  }
  const text = data.text || (data.status === "transcribing" ? "…" : "");
  if (!text && data.role === "assistant" && data.status === "cancelled") {
    body.className = "text quiet";
    body.textContent = "Interrupted before any of the reply was heard.";
    return;
  }
  body.className = "text";
  if (data.heard !== null && data.heard !== undefined && text.startsWith(data.heard) && data.heard !== text) {
    // A truncated reply: what was heard, then the rest (never spoken) struck through.
    const heard = document.createElement("span");
    heard.textContent = data.heard;
    const rest = document.createElement("del");
    rest.textContent = text.slice(data.heard.length);
    rest.title = "not played: interrupted";
    body.append(heard, rest);
  } else {
    body.textContent = text;
  }
}

function updateEntry(itemId, change) {
  const entry = entries.get(itemId);
  if (!entry) return;
  Object.assign(entry.data, change);
  render(entry);
}

// ---- barge-in ------------------------------------------------------------------------------

/** Stop the reply that is playing (or being generated) and report how much of it was heard. */
function interruptPlayback() {
  const itemId = player && player.currentItem();
  if (!itemId) return;
  const response = itemResponse.get(itemId);
  const running = response && response.status === "in_progress";
  if (!player.isPlaying(itemId) && !running) return; // it has finished: nothing to cut
  const cut = player.stop(itemId);
  if (!cut) return;
  const audioEndMs = Math.floor(cut.playedMs);
  if (audioEndMs > 0 && audioEndMs <= cut.receivedMs) {
    client.send("conversation.item.truncate", { item_id: itemId, content_index: 0, audio_end_ms: audioEndMs });
    state.truncatesSent.push({ item_id: itemId, audio_end_ms: audioEndMs, received_ms: Math.round(cut.receivedMs) });
  }
  updateEntry(itemId, { status: "cancelled" });
}

// ---- server events -------------------------------------------------------------------------

const handlers = {
  "session.created"(e) {
    state.sessionId = e.session.id;
    // The defaults, said explicitly: 24 kHz PCM both ways, server VAD that answers and can be interrupted.
    client.send("session.update", {
      session: {
        type: "realtime",
        output_modalities: ["audio"],
        audio: {
          input: {
            format: { type: "audio/pcm", rate: 24000 },
            turn_detection: { type: "server_vad", create_response: true, interrupt_response: true },
          },
          output: { format: { type: "audio/pcm", rate: 24000 } },
        },
      },
    });
    setStatus(mic ? "Listening" : "Connected", "listening");
  },

  "input_audio_buffer.speech_started"() {
    state.speechStarted += 1;
    hearing = true;
    interruptPlayback();
    setStatus("Hearing you…", "hearing");
    if ($("auto-snapshot").checked && camera.running) sendSnapshot();
  },

  "input_audio_buffer.speech_stopped"() {
    state.speechStopped += 1;
    hearing = false;
    turnMark = performance.now();
    setStatus("Thinking…", "thinking");
  },

  "conversation.item.added"(e) {
    const item = e.item;
    if (item.role !== "user") return; // assistant items: response.output_item.added
    for (const part of item.content || []) {
      if (part.type === "input_audio") {
        addEntry(item.id, "user", "audio", part.transcript || "", part.transcript ? "done" : "transcribing");
      } else if (part.type === "input_text") {
        addEntry(item.id, "user", "text", part.text, "done");
      } else if (part.type === "input_image") {
        addEntry(item.id, "user", "image", "", "done");
      }
    }
  },

  "conversation.item.input_audio_transcription.completed"(e) {
    updateEntry(e.item_id, { text: e.transcript, status: "done" });
  },

  "conversation.item.deleted"(e) {
    updateEntry(e.item_id, { status: "removed" });
  },

  "response.created"(e) {
    state.responsesCreated += 1;
    const row = { id: e.response.id, itemId: null, status: "in_progress", reason: null, latencyMs: null };
    if (turnMark !== null) marks.set(row.id, turnMark);
    turnMark = null;
    responses.set(row.id, row);
    state.responses.push(row);
    $("snapshot-note").textContent = ""; // pending snapshots are part of this turn now
  },

  "response.output_item.added"(e) {
    const row = responses.get(e.response_id);
    if (row) {
      row.itemId = e.item.id;
      itemResponse.set(e.item.id, row);
    }
    addEntry(e.item.id, "assistant", "audio", "", "speaking");
  },

  "response.output_audio_transcript.delta"(e) {
    const entry = entries.get(e.item_id);
    if (entry) updateEntry(e.item_id, { text: entry.data.text + e.delta });
  },
  "response.output_text.delta"(e) {
    handlers["response.output_audio_transcript.delta"](e);
  },
  "response.output_audio_transcript.done"(e) {
    // A cancelled reply's transcript is what was heard: keep the streamed rest, shown struck through.
    const entry = entries.get(e.item_id);
    const streamed = entry ? entry.data.text : "";
    if (streamed.length > e.transcript.length && streamed.startsWith(e.transcript)) {
      updateEntry(e.item_id, { heard: e.transcript });
    } else {
      updateEntry(e.item_id, { text: e.transcript });
    }
  },
  "response.output_text.done"(e) {
    updateEntry(e.item_id, { text: e.text, kind: "text" });
  },

  "response.output_audio.delta"(e) {
    const pcm = base64ToPcm16(e.delta);
    state.audioDeltas += 1;
    state.audioMsReceived += (pcm.length * 1000) / 24000;
    if (player) player.enqueue(e.item_id, pcm);
  },

  "response.done"(e) {
    const r = e.response;
    state.responsesDone += 1;
    const row = responses.get(r.id);
    if (row) {
      row.status = r.status;
      row.reason = r.status_details ? r.status_details.reason || r.status_details.type : null;
      if (row.itemId) {
        const entry = entries.get(row.itemId);
        const status = r.status === "completed" && entry && entry.data.status === "cancelled" ? "cancelled" : r.status;
        updateEntry(row.itemId, { status });
      }
    }
    if (r.status === "failed" && r.status_details && r.status_details.error) {
      showError(`The reply failed: ${r.status_details.error.message}`, r.status_details.error.code);
    }
    if (hearing) setStatus("Hearing you…", "hearing");
    else setStatus(mic ? "Listening" : "Connected", "listening");
    if (createAfterDone) {
      createAfterDone = false;
      turnMark = performance.now();
      client.send("response.create");
    }
  },

  "conversation.item.truncated"(e) {
    state.truncated.push({ item_id: e.item_id, audio_end_ms: e.audio_end_ms });
    updateEntry(e.item_id, { truncatedMs: e.audio_end_ms });
    client.send("conversation.item.retrieve", { item_id: e.item_id }); // what the history keeps now
  },

  "conversation.item.retrieved"(e) {
    const part = (e.item.content || [])[0];
    if (e.item.role === "assistant" && part && typeof part.transcript === "string") {
      updateEntry(e.item.id, { heard: part.transcript });
    }
  },

  error(e) {
    const err = e.error || {};
    state.errors.push({ type: err.type, code: err.code, message: err.message });
    showError(err.message || "Unknown error", err.code || err.type);
  },
};

function onEvent(event) {
  state.events[event.type] = (state.events[event.type] || 0) + 1;
  const handler = handlers[event.type];
  if (handler) handler(event);
}

// ---- playback bookkeeping ------------------------------------------------------------------

function onFirstPlay(itemId, wallMs) {
  const row = itemResponse.get(itemId);
  if (row && marks.has(row.id) && row.latencyMs === null) recordLatency(row, wallMs - marks.get(row.id));
  setTimeout(() => {
    if (player && player.isPlaying(itemId)) setStatus("Speaking", "speaking");
  }, Math.max(0, wallMs - performance.now()));
}

// ---- connect / disconnect ------------------------------------------------------------------

async function audioContext() {
  if (!ctx) ctx = new AudioContext({ latencyHint: "interactive" });
  if (ctx.state !== "running") await ctx.resume();
  return ctx;
}

async function connect() {
  const context = await audioContext();
  player = new AudioPlayer(context, {
    onFirstPlay,
    onChunkPlayed: (itemId, ms) => {
      state.audioChunksPlayed += 1;
      state.audioMsPlayed += ms;
    },
  });
  setStatus("Connecting…", "connecting");
  $("connect").disabled = true;
  client = new RealtimeClient({
    url: realtimeUrl($("model").value.trim() || "vitaserve"),
    apiKey: $("api-key").value,
    onEvent,
    onOpen: () => startMicrophone(),
    onClose: onClosed,
  });
  client.connect();
}

async function startMicrophone() {
  state.connected = true;
  setConnectedUi(true);
  try {
    mic = new Microphone(ctx, {
      onChunk: (pcm) => {
        if (!client || !client.connected) return;
        client.send("input_audio_buffer.append", { audio: pcm16ToBase64(pcm) });
        state.audioChunksSent += 1;
        showLevel(pcm);
      },
    });
    mic.setMuted($("mute").getAttribute("aria-pressed") === "true");
    await mic.start();
    setStatus("Listening", "listening");
  } catch (err) {
    mic = null;
    showError(`Microphone unavailable: ${err.message}. You can still type questions.`, err.name);
    setStatus("Connected (no microphone)", "listening");
  }
}

function onClosed({ code, reason, opened }) {
  const wasConnected = state.connected;
  teardown();
  if (!opened) {
    // The upgrade was refused (401 bad key, 429 too many sessions, 503 not ready): the browser does not
    // say which, so ask the server whether it is ready.
    fetch("/readyz")
      .then((r) => (r.ok ? "the server refused the session: check the API key" : "the server is not ready"))
      .catch(() => "the server is unreachable")
      .then((why) => showError(`Could not connect: ${why}.`));
    setStatus("Disconnected", "idle");
  } else if (code !== 1000 && wasConnected) {
    showError(`The session ended: ${reason || "connection lost"}.`, `close ${code}`);
    setStatus("Disconnected", "idle");
  } else {
    setStatus("Disconnected", "idle");
  }
}

function teardown() {
  state.connected = false;
  if (mic) mic.stop();
  mic = null;
  if (player) player.reset();
  client = null;
  createAfterDone = false;
  hearing = false;
  turnMark = null;
  setConnectedUi(false);
  showLevel(null);
}

function setConnectedUi(connected) {
  $("connect").disabled = false;
  $("connect").textContent = connected ? "Disconnect" : "Connect";
  $("connect").classList.toggle("danger", connected);
  $("model").disabled = connected;
  $("api-key").disabled = connected;
  $("question").disabled = !connected;
  $("ask").disabled = !connected;
  $("snapshot").disabled = !(connected && camera.running);
}

function showLevel(pcm) {
  let peak = 0;
  if (pcm) for (let i = 0; i < pcm.length; i += 4) peak = Math.max(peak, Math.abs(pcm[i]));
  const level = pcm ? Math.min(1, Math.sqrt(peak / 32768) * 1.2) : 0;
  $("level").style.transform = `scaleX(${level.toFixed(3)})`;
}

// ---- typed questions and snapshots ---------------------------------------------------------

function itemId() {
  return `item_page_${Math.random().toString(36).slice(2, 14)}`;
}

function ask(text) {
  const id = itemId();
  client.send("conversation.item.create", {
    item: { id, type: "message", role: "user", content: [{ type: "input_text", text }] },
  });
  const running = state.responses.some((r) => r.status === "in_progress");
  if (running) {
    // One response at a time: cut the running reply, then ask once it has ended.
    interruptPlayback();
    createAfterDone = true;
    client.send("response.cancel");
  } else {
    turnMark = performance.now();
    client.send("response.create");
  }
}

function sendSnapshot() {
  const url = camera.snapshot();
  if (!url || !client) return;
  const id = itemId();
  snapshots.set(id, url);
  client.send("conversation.item.create", {
    item: { id, type: "message", role: "user", content: [{ type: "input_image", image_url: url }] },
  });
  state.snapshotsSent += 1;
  $("snapshot-note").textContent = "Snapshot sent: it goes with your next question.";
}

async function toggleCamera() {
  if (camera.running) {
    camera.stop();
  } else {
    try {
      await camera.start();
    } catch (err) {
      showError(`Camera unavailable: ${err.message}`, err.name);
    }
  }
  $("camera").textContent = camera.running ? "Stop camera" : "Start camera";
  $("camera-off").hidden = camera.running;
  $("snapshot").disabled = !(state.connected && camera.running);
}

// ---- wiring --------------------------------------------------------------------------------

$("connect-form").addEventListener("submit", (e) => {
  e.preventDefault();
  if (client) {
    client.close();
  } else {
    connect().catch((err) => {
      showError(`Could not start: ${err.message}`, err.name);
      teardown();
      setStatus("Disconnected", "idle");
    });
  }
});

$("mute").addEventListener("click", () => {
  const muted = $("mute").getAttribute("aria-pressed") !== "true";
  $("mute").setAttribute("aria-pressed", String(muted));
  $("mute").textContent = muted ? "Unmute microphone" : "Mute microphone";
  if (mic) mic.setMuted(muted);
});

$("ask-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("question").value.trim();
  if (!text || !client) return;
  ask(text);
  $("question").value = "";
});

$("camera").addEventListener("click", toggleCamera);
$("snapshot").addEventListener("click", sendSnapshot);
