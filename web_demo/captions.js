// Caption export: plain text, SubRip (.srt) and WebVTT (.vtt) from the session's finals.
// Same output as stream_server/core/captions.py (see its docstring): a final longer than one cue is split
// at word boundaries into cues of at most 2 lines of 42 characters and 7 s, timed by the final's
// words where it has them, else by its span shared out in proportion to the characters. A final is
// {start, end, text[, words][, speaker]}, times in seconds; a speaker (0-based, from a diarized
// session) is named "Speaker N" from 1: a "<v Speaker N>" voice span in WebVTT, a "Speaker N: "
// prefix in SubRip and text (counted in the first line's length).

export const MAX_LINE_CHARS = 42;
export const MAX_LINES = 2;
export const MAX_CUE_S = 7.0;

export function timestamp(seconds, separator) {
  let ms = Math.max(0, Math.floor(seconds * 1000 + 0.5));
  const h = Math.floor(ms / 3_600_000); ms -= h * 3_600_000;
  const m = Math.floor(ms / 60_000); ms -= m * 60_000;
  const s = Math.floor(ms / 1000); ms -= s * 1000;
  const pad = (n, w = 2) => String(n).padStart(w, '0');
  return `${pad(h)}:${pad(m)}:${pad(s)}${separator}${pad(ms, 3)}`;
}

const cues = (finals) => finals.filter((f) => f.text.trim() !== '');
const chars = (text) => [...text].length; // code points, as Python's len()

export const speakerName = (speaker) => `Speaker ${Number(speaker) + 1}`;
const hasSpeaker = (f) => f.speaker !== undefined && f.speaker !== null;
const prefixed = (f) => (hasSpeaker(f) ? `${speakerName(f.speaker)}: ${f.text.trim()}` : f.text.trim());

function timedWords(final) {
  const speaker = hasSpeaker(final) ? final.speaker : null;
  if (final.words?.length) {
    return final.words.map((w) => [w.word, w.start, w.end, w.speaker ?? speaker]);
  }
  const tokens = final.text.split(/\s+/).filter((t) => t !== '');
  const total = tokens.reduce((n, t) => n + chars(t) + 1, 0);
  let at = final.start;
  return tokens.map((token) => {
    const span = ((final.end - final.start) * (chars(token) + 1)) / total;
    const word = [token, at, at + span, speaker];
    at += span;
    return word;
  });
}

export function splitCues(final) {
  const out = [];
  let lines = [];
  let start = 0;
  let end = 0;
  let speaker = null;
  const close = () => { if (lines.length) out.push({ start, end, lines, speaker }); };
  for (const [word, wordStart, wordEnd, wordSpeaker] of timedWords(final)) {
    if (lines.length && (wordSpeaker !== speaker || wordEnd - start > MAX_CUE_S)) {
      close();
      lines = [];
    }
    if (lines.length) {
      const prefix = speaker !== null && lines.length === 1 ? chars(speakerName(speaker)) + 2 : 0;
      if (chars(lines[lines.length - 1]) + 1 + chars(word) <= MAX_LINE_CHARS - prefix) {
        lines[lines.length - 1] += ` ${word}`;
      } else if (lines.length < MAX_LINES) {
        lines.push(word);
      } else {
        close();
        lines = [];
      }
    }
    if (!lines.length) {
      lines = [word]; start = wordStart; end = wordEnd; speaker = wordSpeaker;
    }
    end = Math.max(end, wordEnd);
  }
  close();
  return out;
}

function cueText(cue, voice) {
  const text = cue.lines.join('\n');
  if (cue.speaker === null || cue.speaker === undefined) return text;
  return voice ? `<v ${speakerName(cue.speaker)}>${text}` : `${speakerName(cue.speaker)}: ${text}`;
}

export function toText(finals) {
  return cues(finals).map((f) => `${prefixed(f)}\n`).join('');
}

export function toSrt(finals) {
  return cues(finals)
    .flatMap(splitCues)
    .map((c, i) => `${i + 1}\n${timestamp(c.start, ',')} --> ${timestamp(c.end, ',')}\n${cueText(c, false)}\n`)
    .join('\n');
}

export function toVtt(finals) {
  const blocks = cues(finals)
    .flatMap(splitCues)
    .map((c) => `${timestamp(c.start, '.')} --> ${timestamp(c.end, '.')}\n${cueText(c, true)}\n`);
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
