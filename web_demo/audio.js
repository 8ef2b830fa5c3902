// Microphone capture: getUserMedia → AudioWorklet (pcm-worklet.js) → 16 kHz PCM16 frames.

export const SAMPLE_RATE = 16000;

/**
 * Open the microphone. `onFrame({samples, index, rms, peak, capturedAt})` is called for every
 * frame; `capturedAt` (performance.now() ms) is when the frame's last sample reached the page,
 * i.e. its capture time plus the audio thread's small delivery delay.
 * Resolves to {label, inputRate, close()}; `close()` flushes the last partial frame first.
 */
export async function openMicrophone({ onFrame, frameMs = 100 }) {
  if (!window.isSecureContext || !navigator.mediaDevices?.getUserMedia) {
    throw new Error('The microphone needs a secure context: open this page over https:// or at http://localhost.');
  }
  if (!window.AudioWorkletNode) throw new Error('This browser has no AudioWorklet support.');
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: false, autoGainControl: true },
  });
  const context = new AudioContext({ latencyHint: 'interactive' });
  try {
    await context.audioWorklet.addModule(new URL('./pcm-worklet.js', import.meta.url));
    const source = context.createMediaStreamSource(stream);
    const node = new AudioWorkletNode(context, 'pcm-capture', {
      numberOfInputs: 1,
      numberOfOutputs: 0,
      channelCountMode: 'explicit',
      channelCount: 1,
      processorOptions: { frameMs },
    });
    node.port.onmessage = (event) => onFrame({ ...event.data, capturedAt: performance.now() });
    source.connect(node);
    if (context.state !== 'running') await context.resume();
    const [track] = stream.getAudioTracks();
    return {
      label: track?.label || 'microphone',
      inputRate: context.sampleRate,
      async close() {
        node.port.postMessage('flush');
        await new Promise((resolve) => setTimeout(resolve, 50)); // let the flushed frame arrive
        source.disconnect();
        node.port.onmessage = null;
        stream.getTracks().forEach((t) => t.stop());
        await context.close();
      },
    };
  } catch (error) {
    stream.getTracks().forEach((t) => t.stop());
    context.close();
    throw error;
  }
}
