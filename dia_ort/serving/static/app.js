// The page's client: asks /v1/audio/speech for 24 kHz 16-bit PCM and plays each chunk as it arrives
// through the Web Audio API, so the audio starts while the rest is still being generated.
"use strict";

const RATE = 24000; // the server's pcm format
const $ = (id) => document.getElementById(id);

function headers() {
  const key = $("api_key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

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
    model: "dia",
    input: $("script").value,
    voice: $("voice").value || "alloy",
    response_format: "pcm",
    temperature: number("temperature"),
    top_p: number("top_p"),
    cfg_scale: number("cfg_scale"),
  };
  if ($("seed").value !== "") body.seed = number("seed");
  return body;
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

async function play() {
  $("error").textContent = "";
  $("play").disabled = true;
  $("download").hidden = true;
  const context = new AudioContext({ sampleRate: RATE });
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
    }
    const link = $("download");
    link.href = URL.createObjectURL(wav(all));
    link.hidden = false;
  } catch (error) {
    $("error").textContent = error.message;
  } finally {
    $("play").disabled = false;
    setTimeout(() => clearInterval(timer), (scheduled + 1) * 1000);
  }
}

$("play").addEventListener("click", play);
loadVoices();
