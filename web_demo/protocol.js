// Protocol v1 client (docs/protocol.md): one WebSocket per stream, reopened with backoff when it
// drops. Each (re)connection is a new server session: it sends `start`, waits for `ready`, then
// streams the audio captured meanwhile (up to BACKLOG_S of it) and from then on.

const BACKLOG_S = 20; // audio kept while (re)connecting
const BACKOFF_MS = [500, 1000, 2000, 4000, 8000, 15000];
const STABLE_MS = 10_000; // a session that lived this long resets the backoff
const STOP_TIMEOUT_MS = 20_000; // wait this long for `end` after `stop`

/** ws: or wss: URL of the listen endpoint, relative to the page (works behind a path prefix). */
export function listenUrl(base = location.href) {
  const url = new URL('v1/listen', base);
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  return url.href;
}

/**
 * Streams audio frames to the server.
 *
 * Callbacks:
 *   onState(state, detail) — 'connecting' | 'live' | 'reconnecting' (detail.delayMs, detail.attempt)
 *                            | 'finishing' | 'closed' | 'failed' (detail.reason)
 *   onEvent(message, session) — every server message; `session.audioOffset` is the capture-clock
 *                            index (16 kHz samples) of this session's stream time 0.
 */
export class StreamClient {
  constructor({ url, startMessage, onEvent, onState, sampleRate = 16000 }) {
    this.url = url;
    this.startMessage = startMessage; // () => the `start` object; called for every (re)connection
    this.onEvent = onEvent;
    this.onState = onState;
    this.sampleRate = sampleRate;
    this.backlog = []; // frames {index, samples} not yet sent
    this.backlogSamples = 0;
    this.attempt = 0;
    this.session = null; // {id, ws, ready, audioOffset, readyAt}
    this.stopping = null; // {resolve, timer} once stop() was called
    this.closed = false;
    this.timer = null;
  }

  open() {
    this.connect();
  }

  connect() {
    this.onState('connecting', { attempt: this.attempt });
    const ws = new WebSocket(this.url);
    ws.binaryType = 'arraybuffer';
    const session = { ws, ready: false, audioOffset: null, readyAt: 0, ended: false };
    this.session = session;
    ws.onopen = () => ws.send(JSON.stringify(this.startMessage()));
    ws.onmessage = (event) => this.receive(session, event.data);
    ws.onclose = (event) => this.closedSession(session, event);
  }

  receive(session, data) {
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      return; // the server only sends JSON text; ignore anything else
    }
    if (message.type === 'ready') {
      session.ready = true;
      session.readyAt = performance.now();
      this.onState('live', {});
      this.flush();
    } else if (message.type === 'end') {
      session.ended = true;
    }
    this.onEvent(message, session);
    if (message.type === 'error' && !session.ready && message.code === 'bad_config') {
      // The server waits for a valid start; ours will not get better by retrying.
      this.fail(`the server refused the settings: ${message.message}`);
    }
  }

  /** Queue one frame {index, samples: ArrayBuffer}; sent at once when live, kept while connecting. */
  sendAudio(frame) {
    if (this.closed || this.stopping) return;
    this.backlog.push(frame);
    this.backlogSamples += frame.samples.byteLength / 2;
    while (this.backlogSamples > BACKLOG_S * this.sampleRate && this.backlog.length > 1) {
      this.backlogSamples -= this.backlog.shift().samples.byteLength / 2;
    }
    if (this.session?.ready) this.flush();
  }

  flush() {
    const session = this.session;
    if (!session?.ready || session.ws.readyState !== WebSocket.OPEN) return;
    for (const frame of this.backlog) {
      if (session.audioOffset === null) session.audioOffset = frame.index;
      session.ws.send(frame.samples);
    }
    this.backlog = [];
    this.backlogSamples = 0;
  }

  /** Send a `configure` (applies from the next utterance) when live; later sessions use startMessage(). */
  configure(fields) {
    const session = this.session;
    if (session?.ready && session.ws.readyState === WebSocket.OPEN && !this.stopping) {
      session.ws.send(JSON.stringify({ type: 'configure', ...fields }));
      return true;
    }
    return false;
  }

  /** End of stream: the server finalizes open audio, sends the finals and `end`, then closes. */
  stop() {
    if (this.closed) return Promise.resolve();
    clearTimeout(this.timer);
    const session = this.session;
    return new Promise((resolve) => {
      this.stopping = { resolve, timer: setTimeout(() => this.finish('closed'), STOP_TIMEOUT_MS) };
      if (session?.ready && session.ws.readyState === WebSocket.OPEN) {
        this.flush();
        session.ws.send(JSON.stringify({ type: 'stop' }));
        this.onState('finishing', {});
      } else {
        session?.ws.close(1000);
        this.finish('closed');
      }
    });
  }

  fail(reason) {
    this.session?.ws.close(1000);
    this.finish('failed', { reason });
  }

  finish(state, detail = {}) {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.timer);
    if (this.stopping) {
      clearTimeout(this.stopping.timer);
      this.stopping.resolve();
    }
    this.onState(state, detail);
  }

  closedSession(session, event) {
    if (session !== this.session || this.closed) return;
    if (this.stopping || session.ended) {
      this.finish('closed');
      return;
    }
    // Unexpected: reconnect with exponential backoff (± 20 % jitter).
    if (session.ready && performance.now() - session.readyAt > STABLE_MS) this.attempt = 0;
    const base = BACKOFF_MS[Math.min(this.attempt, BACKOFF_MS.length - 1)];
    const delayMs = Math.round(base * (0.8 + 0.4 * Math.random()));
    this.attempt += 1;
    this.onState('reconnecting', { delayMs, attempt: this.attempt, code: event.code, reason: event.reason });
    this.timer = setTimeout(() => this.connect(), delayMs);
  }
}
