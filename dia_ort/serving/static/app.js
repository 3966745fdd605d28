// The page's client: asks /v1/audio/speech for 24 kHz 16-bit PCM and plays each chunk as it arrives
// through the Web Audio API, so the audio starts while the rest is still being generated, drawing
// its waveform as it comes. A voice is cloned from a clip (a file, or a recording from the
// microphone), sent to /v1/audio/voices as a 24 kHz WAV.
"use strict";

const RATE = 24000; // the server's pcm format
const $ = (id) => document.getElementById(id);

function headers() {
  const key = $("api_key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

let family = "dia"; // the served model's family: Dia2 takes seed and cfg_scale, not temperature or top_p

async function loadHealth() {
  const health = await (await fetch("/health")).json();
  family = health.family;
  $("server").textContent =
    `model ${health.model} (${family}) · variant ${health.compute_dtype} · ` +
    `batch of up to ${health.max_batch} requests`;
  if (family === "dia2") {
    for (const id of ["temperature", "top_p"]) $(id).closest("label").style.display = "none";
    $("cfg_scale").value = "2.0"; // Dia2's default
  }
  $("play").disabled = false; // a request needs the family's options
}

// -- cloning a voice -----------------------------------------------------------------------------

let clip = null; // the clip to clone a voice from: a Blob
let recorder = null; // the MediaRecorder while recording

function showClip(label) {
  $("clip").textContent = clip ? label : "no clip yet";
  $("save_voice").disabled = !clip;
}

$("voice_file").addEventListener("change", () => {
  const file = $("voice_file").files[0];
  clip = file || null;
  showClip(file ? `file ${file.name}` : "");
});

$("record").addEventListener("click", async () => {
  if (recorder) {
    recorder.stop();
    return;
  }
  $("error").textContent = "";
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    const parts = [];
    recorder = new MediaRecorder(stream);
    recorder.ondataavailable = (event) => parts.push(event.data);
    recorder.onstop = () => {
      stream.getTracks().forEach((track) => track.stop());
      clip = new Blob(parts, { type: recorder.mimeType });
      recorder = null;
      $("record").textContent = "Record";
      showClip("recording");
    };
    recorder.start();
    $("record").textContent = "Stop recording";
  } catch (error) {
    $("error").textContent = `microphone: ${error.message}`;
  }
});

async function wavOf(blob) {
  // any clip the browser decodes (wav, flac, mp3, ogg, a MediaRecorder's webm) -> 24 kHz mono WAV
  const decoded = await new AudioContext().decodeAudioData(await blob.arrayBuffer());
  const offline = new OfflineAudioContext(1, Math.ceil(decoded.duration * RATE), RATE);
  const source = offline.createBufferSource();
  source.buffer = decoded;
  source.connect(offline.destination);
  source.start();
  const mono = (await offline.startRendering()).getChannelData(0);
  return wav([Int16Array.from(mono, (s) => Math.max(-32768, Math.min(32767, Math.round(s * 32767))))]);
}

function base64(buffer) {
  const bytes = new Uint8Array(buffer);
  let text = "";
  for (let at = 0; at < bytes.length; at += 0x8000) text += String.fromCharCode(...bytes.subarray(at, at + 0x8000));
  return btoa(text);
}

$("save_voice").addEventListener("click", async () => {
  $("error").textContent = "";
  $("save_voice").disabled = true;
  try {
    const body = {
      name: $("voice_name").value.trim(),
      transcript: $("voice_text").value.trim(),
      audio: base64(await (await wavOf(clip)).arrayBuffer()),
    };
    const response = await fetch("/v1/audio/voices", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...headers() },
      body: JSON.stringify(body),
    });
    if (!response.ok) throw new Error((await response.json()).error.message);
    const saved = await response.json();
    await loadVoices();
    $("voice").value = saved.name;
    $("clip").textContent = `saved as ${saved.name} (${saved.seconds.toFixed(1)} s)`;
  } catch (error) {
    $("error").textContent = `voice: ${error.message}`;
  } finally {
    $("save_voice").disabled = !clip;
  }
});

// -- speaking ------------------------------------------------------------------------------------

async function loadVoices() {
  const select = $("voice");
  try {
    const response = await fetch("/v1/audio/voices", { headers: headers() });
    if (!response.ok) throw new Error((await response.json()).error.message);
    const { voices } = await response.json();
    select.replaceChildren(...voices.map((v) => new Option(v.prompt ? `${v.name} (cloned)` : v.name, v.name)));
  } catch (error) {
    select.replaceChildren(new Option("alloy", "alloy"));
    $("error").textContent = `voices: ${error.message}`;
  }
}

for (const button of document.querySelectorAll("button[data-tag]")) {
  button.addEventListener("click", () => {
    const box = $("script");
    const at = box.selectionStart;
    box.setRangeText(` ${button.dataset.tag} `, at, box.selectionEnd, "end");
    box.focus();
  });
}

function request() {
  const number = (id) => Number($(id).value);
  const body = {
    model: family,
    input: $("script").value,
    voice: $("voice").value || "alloy",
    response_format: "pcm",
    cfg_scale: number("cfg_scale"),
  };
  if (family === "dia") Object.assign(body, { temperature: number("temperature"), top_p: number("top_p") });
  if ($("seed").value !== "") body.seed = number("seed");
  return body;
}

function drawWave(chunks, samples) {
  // the waveform of everything received so far: each column the peak of its share of the samples
  const canvas = $("wave");
  const draw = canvas.getContext("2d");
  draw.clearRect(0, 0, canvas.width, canvas.height);
  draw.fillStyle = "#1f5fbf";
  const all = new Int16Array(samples);
  chunks.reduce((at, c) => (all.set(c, at), at + c.length), 0);
  const step = Math.max(1, Math.ceil(all.length / canvas.width));
  for (let x = 0; x * step < all.length; x++) {
    let peak = 0;
    for (let i = x * step; i < Math.min(all.length, (x + 1) * step); i++) peak = Math.max(peak, Math.abs(all[i]));
    const height = Math.max(1, (peak / 32768) * canvas.height);
    draw.fillRect(x, (canvas.height - height) / 2, 1, height);
  }
  canvas.dataset.samples = String(all.length);
}

function wav(chunks) {
  // 16-bit mono WAV of everything received, for the download link
  const samples = new Int16Array(chunks.reduce((n, c) => n + c.length, 0));
  chunks.reduce((at, c) => (samples.set(c, at), at + c.length), 0);
  const bytes = new DataView(new ArrayBuffer(44 + samples.length * 2));
  const text = (at, s) => [...s].forEach((c, i) => bytes.setUint8(at + i, c.charCodeAt(0)));
  text(0, "RIFF"); bytes.setUint32(4, 36 + samples.length * 2, true); text(8, "WAVEfmt ");
  bytes.setUint32(16, 16, true); bytes.setUint16(20, 1, true); bytes.setUint16(22, 1, true);
  bytes.setUint32(24, RATE, true); bytes.setUint32(28, RATE * 2, true); bytes.setUint16(32, 2, true);
  bytes.setUint16(34, 16, true); text(36, "data"); bytes.setUint32(40, samples.length * 2, true);
  samples.forEach((s, i) => bytes.setInt16(44 + i * 2, s, true));
  return new Blob([bytes], { type: "audio/wav" });
}

let stopping = null; // aborts the request that is playing

async function play() {
  $("error").textContent = "";
  $("play").disabled = true;
  $("stop").disabled = false;
  $("download").hidden = true;
  const controller = new AbortController();
  const context = new AudioContext({ sampleRate: RATE });
  stopping = () => {
    controller.abort(); // the server sees the client leave and frees the request's rows
    context.close();
  };
  const began = performance.now();
  let startAt = 0; // when the audio starts on the context's clock
  let scheduled = 0; // seconds of audio scheduled so far
  let carry = null; // an odd byte left over from the last network chunk
  const all = [];
  const timer = setInterval(() => {
    const played = startAt ? Math.min(scheduled, Math.max(0, context.currentTime - startAt)) : 0;
    $("played").textContent = played.toFixed(2);
  }, 100);
  try {
    const response = await fetch("/v1/audio/speech", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...headers() },
      body: JSON.stringify(request()),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error((await response.json()).error.message);
    const reader = response.body.getReader();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      let bytes = value;
      if (carry) { bytes = new Uint8Array([carry, ...value]); carry = null; }
      if (bytes.length % 2) { carry = bytes[bytes.length - 1]; bytes = bytes.subarray(0, bytes.length - 1); }
      if (!bytes.length) continue;
      const pcm = new Int16Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.length));
      all.push(pcm);
      const buffer = context.createBuffer(1, pcm.length, RATE);
      buffer.getChannelData(0).set(Float32Array.from(pcm, (s) => s / 32768));
      const source = context.createBufferSource();
      source.buffer = buffer;
      source.connect(context.destination);
      if (!startAt) {
        startAt = context.currentTime + 0.05;
        $("ttfa").textContent = `${((performance.now() - began) / 1000).toFixed(2)} s`;
      }
      source.start(startAt + scheduled);
      scheduled += pcm.length / RATE;
      $("received").textContent = scheduled.toFixed(2);
      drawWave(all, Math.round(scheduled * RATE));
    }
    const link = $("download");
    link.href = URL.createObjectURL(wav(all));
    link.hidden = false;
  } catch (error) {
    if (!controller.signal.aborted) $("error").textContent = error.message;
  } finally {
    $("play").disabled = false;
    $("stop").disabled = true;
    stopping = null;
    if (controller.signal.aborted) {
      clearInterval(timer);
      $("played").textContent = "stopped";
    } else {
      setTimeout(() => clearInterval(timer), (scheduled + 1) * 1000);
    }
  }
}

$("play").addEventListener("click", play);
$("stop").addEventListener("click", () => stopping && stopping());
loadHealth();
loadVoices();
