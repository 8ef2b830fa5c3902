// Caption export: plain text, SubRip (.srt) and WebVTT (.vtt) from the session's finals.
// Same output as stream_server/captions.py. A cue is {start, end, text[, speaker]}, times in seconds;
// a speaker (0-based, from a diarized session) is named "Speaker N" from 1: a "<v Speaker N>" voice
// span in WebVTT, a "Speaker N: " prefix in SubRip and text.

export function timestamp(seconds, separator) {
  let ms = Math.max(0, Math.round(seconds * 1000));
  const h = Math.floor(ms / 3_600_000); ms -= h * 3_600_000;
  const m = Math.floor(ms / 60_000); ms -= m * 60_000;
  const s = Math.floor(ms / 1000); ms -= s * 1000;
  const pad = (n, w = 2) => String(n).padStart(w, '0');
  return `${pad(h)}:${pad(m)}:${pad(s)}${separator}${pad(ms, 3)}`;
}

const cues = (finals) => finals.filter((f) => f.text.trim() !== '');

export const speakerName = (speaker) => `Speaker ${Number(speaker) + 1}`;
const hasSpeaker = (f) => f.speaker !== undefined && f.speaker !== null;
const prefixed = (f) => (hasSpeaker(f) ? `${speakerName(f.speaker)}: ${f.text.trim()}` : f.text.trim());
const voiced = (f) => (hasSpeaker(f) ? `<v ${speakerName(f.speaker)}>${f.text.trim()}` : f.text.trim());

export function toText(finals) {
  return cues(finals).map((f) => `${prefixed(f)}\n`).join('');
}

export function toSrt(finals) {
  return cues(finals)
    .map((f, i) => `${i + 1}\n${timestamp(f.start, ',')} --> ${timestamp(f.end, ',')}\n${prefixed(f)}\n`)
    .join('\n');
}

export function toVtt(finals) {
  const blocks = cues(finals).map(
    (f) => `${timestamp(f.start, '.')} --> ${timestamp(f.end, '.')}\n${voiced(f)}\n`,
  );
  return ['WEBVTT\n', ...blocks].join('\n');
}

export const FORMATS = {
  srt: { render: toSrt, mime: 'application/x-subrip' },
  vtt: { render: toVtt, mime: 'text/vtt' },
  txt: { render: toText, mime: 'text/plain' },
};

/** Offer `text` as a download named `filename` (generated here; nothing is uploaded). */
export function download(filename, text, mime) {
  const url = URL.createObjectURL(new Blob([text], { type: `${mime};charset=utf-8` }));
  const a = Object.assign(document.createElement('a'), { href: url, download: filename });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}
