// The page: controls, captions, status, export. Protocol in protocol.js, capture in audio.js,
// caption files in captions.js.
//
// Times. Captions are timed in seconds since the caption session began (the first Start after
// loading or Clear). Every audio frame remembers when it reached the page (`capturedAt`), so a
// stream time t of a server session maps to the wall-clock moment its audio was captured:
//   captureIndex = session.audioOffset + t * 16000  →  captureTime(captureIndex) (see below).
// Latency of a final = its arrival time − the capture time of its `end` (the last audio of the
// utterance): how long after the audio was spoken its final caption appeared. It includes the
// VAD's end-of-speech silence wait (vad.silence_ms), decoding and the network.
// Partial lag = arrival of a partial − capture time of its `end`.

import { openMicrophone, SAMPLE_RATE } from './audio.js';
import { StreamClient, listenUrl } from './protocol.js';
import { FORMATS, download, speakerName, timestamp } from './captions.js';

const $ = (id) => document.getElementById(id);
const el = {
  toggle: $('toggle'), captionMode: $('caption-mode'), conn: $('conn'), level: $('level'),
  engine: $('engine'), errors: $('errors'), scroller: $('captions'), finals: $('finals'),
  partial: $('partial'), empty: $('empty'), jump: $('jump'),
  language: $('language'), task: $('task'), target: $('target'), targetRow: $('target-row'),
  keywords: $('keywords'), keywordsHint: $('keywords-hint'), silence: $('silence'),
  diarize: $('diarize'), diarizeHint: $('diarize-hint'),
  silenceOut: $('silence-out'), applied: $('applied'),
  latLast: $('lat-last'), latMedian: $('lat-median'), lag: $('lag'), mic: $('mic'),
  latSilence: $('lat-silence'), clear: $('clear'),
};
const exportButtons = [...document.querySelectorAll('[data-export]')];

const MAX_KEYWORDS = 100;
const MAX_KEYWORD_CHARS = 64;
const FRAMES_KEPT = 300; // capture-time estimate from the last 30 s of 100 ms frames

const state = {
  engine: null,
  finals: [], // {start, end, text, latency, interrupted}
  latencies: [],
  fields: null, // validated settings (configFields()) used by the next start
  sessionStart: null, // performance.now() at the start of the caption session
  rec: null, // the running recording: {mic, client, frames, partial, stopping}
};

// ---- engine capabilities → controls ---------------------------------------------------------

const languageNames = (() => {
  try {
    return new Intl.DisplayNames([navigator.language || 'en', 'en'], { type: 'language' });
  } catch {
    return null;
  }
})();
const languageLabel = (code) => {
  const name = languageNames?.of(code);
  return name && name !== code ? `${name} (${code})` : code;
};

function setOptions(select, values, label) {
  const previous = select.value;
  select.replaceChildren(...values.map((v) => new Option(label(v), v)));
  if (values.includes(previous)) select.value = previous;
}

function applyEngine(engine) {
  state.engine = engine;
  el.engine.textContent = `${engine.name} · ${engine.model}`;
  const languages = engine.languages?.length ? engine.languages : ['en'];
  const hadLanguage = el.language.options.length > 0;
  setOptions(el.language, languages, languageLabel);
  if (!hadLanguage && languages.includes('en')) el.language.value = 'en';
  const tasks = engine.tasks?.length ? engine.tasks : ['transcribe'];
  setOptions(el.task, tasks, (t) => (t === 'translate' ? 'Translate' : 'Transcribe'));
  el.keywords.disabled = !engine.keywords;
  el.keywordsHint.textContent = engine.keywords
    ? 'Comma-separated; applied from the next utterance.'
    : `Keyword biasing is not supported by ${engine.name}.`;
  el.diarize.disabled = !engine.diarization;
  if (el.diarize.disabled) el.diarize.checked = false;
  el.diarizeHint.textContent = engine.diarization
    ? 'Who said what: each caption gets a speaker and a colour (one microphone, several people).'
    : 'Speaker labels are not available on this server.';
  updateTargets();
}

function updateTargets() {
  const translate = el.task.value === 'translate';
  const pairs = state.engine?.translation_pairs ?? [];
  const targets = [...new Set(pairs.filter(([src]) => src === el.language.value).map(([, dst]) => dst))];
  setOptions(el.target, targets, languageLabel);
  el.targetRow.hidden = !translate;
  el.target.disabled = targets.length === 0;
  if (translate && targets.length === 0) {
    showNotice(`No translation from ${languageLabel(el.language.value)} is offered by this engine.`);
  }
}

async function loadCapabilities() {
  try {
    const response = await fetch('readyz', { cache: 'no-store' });
    const body = await response.json();
    if (body.engine) applyEngine(body.engine);
  } catch {
    el.engine.textContent = 'engine: unknown until connected';
    applyEngine({ name: 'server', model: '?', languages: ['en'], tasks: ['transcribe'], translation_pairs: [], keywords: true });
  }
}

// ---- settings ---------------------------------------------------------------------------------

function parseKeywords() {
  const words = el.keywords.value
    .split(/[,\n]/)
    .map((w) => w.replace(/[\u0000-\u001f\u007f]/g, ' ').replace(/\s+/g, ' ').trim())
    .filter(Boolean);
  const tooLong = words.find((w) => w.length > MAX_KEYWORD_CHARS);
  if (tooLong) throw new Error(`Keyword “${tooLong.slice(0, 20)}…” is longer than ${MAX_KEYWORD_CHARS} characters.`);
  if (words.length > MAX_KEYWORDS) throw new Error(`At most ${MAX_KEYWORDS} keywords are allowed.`);
  return [...new Set(words)];
}

function configFields() {
  const fields = {
    task: el.task.value || 'transcribe',
    language: el.language.value || null,
    target_language: el.task.value === 'translate' ? el.target.value || null : null,
    partials: true,
    vad: { silence_ms: Number(el.silence.value) },
  };
  if (!el.keywords.disabled) fields.keywords = parseKeywords();
  if (el.diarize.checked && !el.diarize.disabled) fields.diarize = true;
  return fields;
}

/** The `start` of every (re)connection: the last settings that passed validation. */
function startMessage() {
  return { type: 'start', audio: { encoding: 'pcm_s16le', sample_rate: SAMPLE_RATE, channels: 1 }, ...state.fields };
}

function settingsChanged() {
  el.silenceOut.textContent = `${el.silence.value} ms`;
  el.latSilence.textContent = el.silence.value;
  let fields;
  try {
    fields = configFields();
  } catch (error) {
    showError('settings', error.message);
    return;
  }
  state.fields = fields;
  if (state.rec?.client.configure(fields)) el.applied.textContent = 'Sending settings…';
}

// ---- status -----------------------------------------------------------------------------------

const STATE_TEXT = {
  idle: 'Idle', connecting: 'Connecting…', live: 'Live', finishing: 'Finishing…', closed: 'Stopped', failed: 'Failed',
};

function setConnection(name, text = STATE_TEXT[name]) {
  el.conn.dataset.state = name;
  el.conn.textContent = text;
}

function showError(code, message) {
  const item = document.createElement('li');
  const text = document.createElement('span');
  text.textContent = code ? `${code}: ${message}` : message;
  const close = Object.assign(document.createElement('button'), { type: 'button', textContent: '×', title: 'Dismiss' });
  close.setAttribute('aria-label', 'Dismiss');
  close.onclick = () => item.remove();
  item.append(text, close);
  el.errors.append(item);
  while (el.errors.children.length > 4) el.errors.firstElementChild.remove();
}

function showNotice(message) {
  el.applied.textContent = message;
}

const seconds = (s) => `${s.toFixed(2)} s`;

function recordLatency(latency) {
  state.latencies.push(latency);
  const sorted = [...state.latencies].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  const median = sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
  el.latLast.textContent = seconds(latency);
  el.latMedian.textContent = `${seconds(median)} (${sorted.length})`;
}

// ---- time mapping -----------------------------------------------------------------------------

/**
 * performance.now() at which capture sample `index` (16 kHz clock of this recording) was captured.
 * Each frame says when it reached the page; the least-delayed of the recent frames is the best
 * estimate (the main thread may take some frames late while busy), and a sliding window follows
 * any drift between the audio clock and the page's clock.
 */
function captureTime(rec, index) {
  let best = Infinity;
  for (const f of rec.frames) best = Math.min(best, f.capturedAt - ((f.end - index) / SAMPLE_RATE) * 1000);
  return Number.isFinite(best) ? best : performance.now();
}

/** A stream time of `session` → {at: capture time (ms), t: seconds since the caption session began}. */
function streamTime(rec, session, t) {
  const at = captureTime(rec, (session.audioOffset ?? 0) + t * SAMPLE_RATE);
  return { at, t: Math.max(0, (at - state.sessionStart) / 1000) };
}

// ---- captions ---------------------------------------------------------------------------------

function clock(t) {
  const [h, m, s] = timestamp(t, '.').split(/[:.]/);
  return h === '00' ? `${m}:${s}` : `${Number(h)}:${m}:${s}`;
}

/** Apply a DOM change, keeping the view pinned to the newest caption if it was there. */
function keepScrolled(change) {
  const box = el.scroller;
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 48;
  change();
  if (atBottom) box.scrollTop = box.scrollHeight;
  el.jump.hidden = atBottom || box.scrollHeight <= box.clientHeight;
}

function appendFinal(final) {
  state.finals.push(final);
  const item = document.createElement('li');
  item.className = final.interrupted ? 'final interrupted' : 'final';
  item.title = `${clock(final.start)}–${clock(final.end)}`;
  const time = Object.assign(document.createElement('time'), { textContent: clock(final.start) });
  const text = Object.assign(document.createElement('span'), { className: 'text' });
  renderWords(text, final);
  item.append(time);
  if (final.speaker != null) {
    // One colour per speaker (8 repeat); each turn inside the utterance gets its own badge.
    const turns = final.turns?.length ? final.turns : [{ speaker: final.speaker }];
    item.dataset.speaker = String(final.speaker % 8);
    for (const turn of turns) {
      const badge = Object.assign(document.createElement('span'), { className: 'speaker', textContent: speakerName(turn.speaker) });
      badge.dataset.speaker = String(turn.speaker % 8);
      item.append(badge);
    }
  }
  item.append(text);
  if (final.latency != null) {
    const lat = Object.assign(document.createElement('span'), { className: 'lat', textContent: seconds(final.latency) });
    lat.title = 'Latency: from the end of this utterance’s audio to the arrival of its final caption';
    item.append(lat);
  }
  if (final.interrupted) {
    item.append(Object.assign(document.createElement('span'), { className: 'tag', textContent: 'connection lost' }));
  }
  keepScrolled(() => el.finals.append(item));
  el.empty.hidden = true;
  exportButtons.forEach((b) => (b.disabled = false));
}

// Words the model was unsure of (an account number, a name) are underlined, with their confidence
// on hover; the rest is plain text, so a caption reads as before.
const LOW_CONFIDENCE = 0.5;

function renderWords(container, final) {
  if (!final.words?.length) {
    container.textContent = final.text;
    return;
  }
  final.words.forEach((word, i) => {
    if (i) container.append(' ');
    if (word.confidence != null && word.confidence < LOW_CONFIDENCE) {
      const span = Object.assign(document.createElement('span'), { className: 'low', textContent: word.word });
      span.title = `confidence ${word.confidence.toFixed(2)}`;
      container.append(span);
    } else {
      container.append(word.word);
    }
  });
}

function appendNote(t, message) {
  const item = document.createElement('li');
  item.className = 'note';
  item.append(
    Object.assign(document.createElement('time'), { textContent: clock(t) }),
    Object.assign(document.createElement('span'), { className: 'text', textContent: message }),
  );
  keepScrolled(() => el.finals.append(item));
}

function renderPartial(partial) {
  keepScrolled(() => {
    if (!partial) {
      el.partial.replaceChildren();
      el.partial.hidden = true;
      return;
    }
    const stable = partial.text.startsWith(partial.stable) ? partial.stable : '';
    const solid = Object.assign(document.createElement('span'), { className: 'stable', textContent: stable });
    const rest = Object.assign(document.createElement('span'), {
      className: 'unstable',
      textContent: partial.text.slice(stable.length) || (partial.text ? '' : '…'),
    });
    const text = Object.assign(document.createElement('span'), { className: 'text' });
    text.append(solid, rest);
    el.partial.replaceChildren(Object.assign(document.createElement('time'), { textContent: clock(partial.start) }), text);
    el.partial.hidden = false;
    el.empty.hidden = true;
  });
}

/** Keep what an unfinished utterance showed when its session is lost. */
function salvagePartial(rec) {
  const p = rec.partial;
  rec.partial = null;
  renderPartial(null);
  if (p?.text.trim()) appendFinal({ start: p.start, end: Math.max(p.end, p.start), text: p.text, latency: null, interrupted: true });
}

// ---- server events ----------------------------------------------------------------------------

function onEvent(rec, message, session) {
  const now = performance.now();
  switch (message.type) {
    case 'ready':
      applyEngine(message.engine);
      el.applied.textContent = `Session ${message.session_id} · protocol ${message.protocol}`;
      break;
    case 'configured':
      el.applied.textContent = 'Settings applied from the next utterance.';
      break;
    case 'speech_started':
      rec.partial = { session, id: message.utterance_id, start: streamTime(rec, session, message.start).t, end: 0, text: '', stable: '' };
      rec.partial.end = rec.partial.start;
      renderPartial(rec.partial);
      break;
    case 'partial': {
      const end = streamTime(rec, session, message.end);
      el.lag.textContent = seconds((now - end.at) / 1000);
      rec.partial = {
        session, id: message.utterance_id, start: streamTime(rec, session, message.start).t, end: end.t,
        text: message.text, stable: message.stable_text,
      };
      renderPartial(rec.partial);
      break;
    }
    case 'final': {
      const end = streamTime(rec, session, message.end);
      const latency = (now - end.at) / 1000;
      if (rec.partial?.session === session && rec.partial.id === message.utterance_id) rec.partial = null;
      renderPartial(rec.partial);
      appendFinal({
        start: streamTime(rec, session, message.start).t, end: end.t, text: message.text, latency,
        speaker: message.speaker, turns: message.speaker_turns,
        words: message.words?.map((w) => ({
          ...w, start: streamTime(rec, session, w.start).t, end: streamTime(rec, session, w.end).t,
        })),
      });
      recordLatency(latency);
      break;
    }
    case 'error':
      showError(message.code, message.message);
      if (message.utterance_id != null) {
        if (rec.partial?.session === session && rec.partial.id === message.utterance_id) rec.partial = null;
        renderPartial(rec.partial);
        appendNote(streamTime(rec, session, message.start ?? 0).t, `(not transcribed: ${message.code})`);
      }
      break;
    default:
      break; // `end` and unknown types: nothing to show
  }
}

function onState(rec, name, detail) {
  if (name === 'reconnecting') {
    salvagePartial(rec);
    const why = detail.code && detail.code !== 1006 ? ` (closed ${detail.code}${detail.reason ? `: ${detail.reason}` : ''})` : '';
    setConnection(name, `Reconnecting in ${(detail.delayMs / 1000).toFixed(1)} s${why}`);
    return;
  }
  if (name === 'failed') {
    showError('', detail.reason);
    salvagePartial(rec);
    stop();
  }
  if (name === 'closed') salvagePartial(rec);
  setConnection(name);
}

// ---- start / stop -----------------------------------------------------------------------------

async function start() {
  try {
    state.fields = configFields();
  } catch (error) {
    showError('settings', error.message);
    return;
  }
  el.toggle.disabled = true;
  state.sessionStart ??= performance.now();
  const rec = { mic: null, client: null, frames: [], partial: null, stopping: false };
  rec.client = new StreamClient({
    url: listenUrl(),
    startMessage,
    onEvent: (message, session) => onEvent(rec, message, session),
    onState: (name, detail) => onState(rec, name, detail),
    sampleRate: SAMPLE_RATE,
  });
  try {
    rec.mic = await openMicrophone({ onFrame: (frame) => onFrame(rec, frame) });
  } catch (error) {
    showError('microphone', error.message || String(error));
    el.toggle.disabled = false;
    return;
  }
  state.rec = rec;
  el.mic.textContent = `${rec.mic.label} · ${rec.mic.inputRate / 1000} kHz → 16 kHz`;
  rec.client.open();
  el.toggle.textContent = 'Stop';
  el.toggle.classList.add('stop');
  el.toggle.disabled = false;
}

function onFrame(rec, frame) {
  const n = frame.samples.byteLength / 2;
  rec.frames.push({ index: frame.index, end: frame.index + n, capturedAt: frame.capturedAt });
  if (rec.frames.length > FRAMES_KEPT) rec.frames.splice(0, rec.frames.length - FRAMES_KEPT);
  const db = 20 * Math.log10(Math.max(frame.rms, 1e-5));
  el.level.value = Math.min(1, Math.max(0, (db + 60) / 60)); // -60 dBFS … 0 dBFS
  rec.client.sendAudio({ index: frame.index, samples: frame.samples });
}

async function stop() {
  const rec = state.rec;
  if (!rec || rec.stopping) return;
  rec.stopping = true;
  el.toggle.disabled = true;
  await rec.mic.close().catch(() => {});
  el.level.value = 0;
  await rec.client.stop();
  state.rec = null;
  el.toggle.textContent = 'Start';
  el.toggle.classList.remove('stop');
  el.toggle.disabled = false;
}

// ---- wiring -----------------------------------------------------------------------------------

el.toggle.addEventListener('click', () => (state.rec ? stop() : start()));
$('settings').addEventListener('submit', (event) => event.preventDefault());

el.captionMode.addEventListener('click', () => {
  const on = document.body.classList.toggle('caption-mode');
  el.captionMode.setAttribute('aria-pressed', String(on));
  el.scroller.scrollTop = el.scroller.scrollHeight;
});

el.jump.addEventListener('click', () => {
  el.scroller.scrollTop = el.scroller.scrollHeight;
  el.jump.hidden = true;
});
el.scroller.addEventListener('scroll', () => {
  const box = el.scroller;
  if (box.scrollHeight - box.scrollTop - box.clientHeight < 48) el.jump.hidden = true;
});

el.language.addEventListener('change', () => { updateTargets(); settingsChanged(); });
el.task.addEventListener('change', () => { updateTargets(); settingsChanged(); });
el.target.addEventListener('change', settingsChanged);
el.keywords.addEventListener('change', settingsChanged);
el.diarize.addEventListener('change', settingsChanged);
el.silence.addEventListener('input', () => { el.silenceOut.textContent = `${el.silence.value} ms`; });
el.silence.addEventListener('change', settingsChanged);

for (const button of exportButtons) {
  button.addEventListener('click', () => {
    const format = FORMATS[button.dataset.export];
    const stamp = new Date().toISOString().slice(0, 19).replace(/[-:]/g, '').replace('T', '-');
    download(`captions-${stamp}.${button.dataset.export}`, format.render(state.finals), format.mime);
  });
}

el.clear.addEventListener('click', () => {
  state.finals = [];
  state.latencies = [];
  if (!state.rec) state.sessionStart = null;
  el.finals.replaceChildren();
  el.empty.hidden = !!state.rec;
  [el.latLast, el.latMedian, el.lag].forEach((node) => (node.textContent = '–'));
  exportButtons.forEach((b) => (b.disabled = true));
});

window.addEventListener('beforeunload', (event) => {
  if (state.rec) event.preventDefault();
});

setConnection('idle');
el.silenceOut.textContent = `${el.silence.value} ms`;
el.latSilence.textContent = el.silence.value;
loadCapabilities();
