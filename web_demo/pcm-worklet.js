// AudioWorklet processor (runs on the audio thread): mixes the microphone to mono, low-passes and
// resamples it from the context's rate to 16 kHz, converts to PCM16 and posts one frame every
// `frameMs` to the page as {samples: ArrayBuffer (Int16 in platform order:
// little-endian on every browser platform), index, rms, peak}.
// `index` is the frame's first sample on this capture's 16 kHz clock (0 = first sample captured).

const OUT_RATE = 16000;
const CUTOFF_HZ = 7000; // below Nyquist at 16 kHz, with room for the filter's transition band

/** Windowed-sinc (Blackman) low-pass taps, normalised to unit DC gain. */
function lowpass(cutoffHz, rate, numTaps) {
  const fc = cutoffHz / rate;
  const mid = (numTaps - 1) / 2;
  const taps = new Float32Array(numTaps);
  let sum = 0;
  for (let k = 0; k < numTaps; k++) {
    const x = k - mid;
    const sinc = x === 0 ? 2 * fc : Math.sin(2 * Math.PI * fc * x) / (Math.PI * x);
    const w = 0.42 - 0.5 * Math.cos((2 * Math.PI * k) / (numTaps - 1)) + 0.08 * Math.cos((4 * Math.PI * k) / (numTaps - 1));
    taps[k] = sinc * w;
    sum += taps[k];
  }
  return taps.map((t) => t / sum);
}

class PcmCaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const frameMs = options.processorOptions?.frameMs ?? 100;
    this.step = sampleRate / OUT_RATE; // input samples per output sample
    // Anti-aliasing filter only when downsampling; ~12 input samples per output sample each side.
    this.taps = this.step > 1 ? lowpass(CUTOFF_HZ, sampleRate, 2 * Math.ceil(12 * this.step) + 1) : null;
    this.work = new Float32Array(0); // filter history (taps - 1 samples) followed by the block
    this.pos = 0; // position of the next output sample, in input samples from the block start
    this.prev = 0; // last filtered sample of the previous block (position -1)
    this.frame = new Int16Array(Math.round((OUT_RATE * frameMs) / 1000));
    this.fill = 0;
    this.index = 0;
    this.sumSquares = 0;
    this.peak = 0;
    this.port.onmessage = (event) => {
      if (event.data === 'flush') this.post();
    };
  }

  /** A reusable buffer of length n (no allocation per block on the audio thread). */
  scratch(n, name) {
    if (this[name]?.length !== n) this[name] = new Float32Array(n);
    return this[name];
  }

  /** Mono input block → low-passed block (same rate). */
  filter(mono) {
    if (!this.taps) return mono;
    const h = this.taps;
    const hist = h.length - 1;
    const n = mono.length;
    if (this.work.length !== hist + n) {
      const grown = new Float32Array(hist + n);
      grown.set(this.work.subarray(Math.max(0, this.work.length - hist)), Math.max(0, hist - this.work.length));
      this.work = grown;
    } else {
      this.work.copyWithin(0, n);
    }
    const w = this.work;
    w.set(mono, hist);
    const out = this.scratch(n, 'filtered');
    for (let i = 0; i < n; i++) {
      let acc = 0;
      for (let k = 0; k <= hist; k++) acc += h[k] * w[hist + i - k];
      out[i] = acc;
    }
    return out;
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true; // not connected (yet)
    const n = channels[0].length;
    const mono = this.scratch(n, 'mono').fill(0);
    for (const ch of channels) for (let i = 0; i < n; i++) mono[i] += ch[i] / channels.length;
    const x = this.filter(mono);
    // Linear interpolation at positions pos, pos + step, … (position -1 is the previous block's last sample).
    while (this.pos <= n - 1) {
      const i0 = Math.floor(this.pos);
      const frac = this.pos - i0;
      const a = i0 < 0 ? this.prev : x[i0];
      const b = frac > 0 ? x[i0 + 1] : a;
      this.push(a + (b - a) * frac);
      this.pos += this.step;
    }
    this.pos -= n;
    this.prev = x[n - 1];
    return true;
  }

  push(value) {
    const v = Math.max(-1, Math.min(1, value));
    this.sumSquares += v * v;
    this.peak = Math.max(this.peak, Math.abs(v));
    this.frame[this.fill++] = Math.round(v < 0 ? v * 32768 : v * 32767);
    if (this.fill === this.frame.length) this.post();
  }

  post() {
    if (this.fill === 0) return;
    const samples = this.frame.slice(0, this.fill).buffer;
    const rms = Math.sqrt(this.sumSquares / this.fill);
    this.port.postMessage({ samples, index: this.index, rms, peak: this.peak }, [samples]);
    this.index += this.fill;
    this.fill = 0;
    this.sumSquares = 0;
    this.peak = 0;
  }
}

registerProcessor('pcm-capture', PcmCaptureProcessor);
