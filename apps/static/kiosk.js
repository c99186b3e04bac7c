// The edge-duet kiosk page: live view, streamed captions, questions, reply history, speech.
// Talks to the server of apps/server.py only (same origin); no third-party code. Model and user text is
// always inserted as textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  token: null,          // bearer token (from #token=... in the URL, kept for this tab only)
  controllerId: null,   // our controller lease, or null when another client controls (we watch)
  watcherId: null,      // our /api/events connection: a lease bound to it ends when this page closes
  prefix: "",           // the "must reply" prefill, stripped from captions and speech
  interval: 1,          // frame_interval_s, for the browser camera
  speech: localStorage.getItem("edgeDuetSpeech") === "on",
  streamingTurn: null,  // turn whose tokens are being shown
  captionTimer: null,
  ws: null,
  retryMs: 500,
  cameraTimer: null,
};

function authHeaders(extra = {}) {
  const h = { ...extra };
  if (state.token) h["Authorization"] = "Bearer " + state.token;
  if (state.controllerId) h["X-Edge-Duet-Controller"] = state.controllerId;
  return h;
}

function withToken(path) {
  return state.token ? path + (path.includes("?") ? "&" : "?") + "access_token=" + encodeURIComponent(state.token) : path;
}

async function api(method, path, body, contentType, extraHeaders = {}) {
  const headers = authHeaders({ ...extraHeaders, ...(contentType ? { "Content-Type": contentType } : {}) });
  const res = await fetch(path, { method, headers, body });
  let data = null;
  try { data = await res.json(); } catch (_) { /* not JSON */ }
  return { ok: res.ok, status: res.status, data };
}

function toast(message, ms = 5000) {
  const el = $("toast");
  el.textContent = message;
  el.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { el.hidden = true; }, ms);
}

function setConn(kind, text) {
  const el = $("conn");
  el.className = "conn " + kind;
  el.textContent = text;
  document.body.dataset.conn = kind;
}

function stripPrefix(text) {
  return state.prefix && text.startsWith(state.prefix) ? text.slice(state.prefix.length) : text;
}

function fmtTime(t) {
  const s = Math.max(0, Math.round(t || 0));
  return Math.floor(s / 60) + ":" + String(s % 60).padStart(2, "0");
}

// ------------------------------------------------------------------ captions and history
function showCaption(text, streaming) {
  const cap = $("caption");
  clearTimeout(state.captionTimer);
  cap.classList.remove("fading");
  cap.classList.toggle("streaming", streaming);
  $("captionText").textContent = text;
  cap.hidden = !text && !streaming;
  if (!streaming) {
    state.captionTimer = setTimeout(() => {
      cap.classList.add("fading");
      state.captionTimer = setTimeout(() => { cap.hidden = true; cap.classList.remove("fading"); }, 1500);
    }, 8000);
  }
}

function addHistory(kind, text, t) {
  const li = document.createElement("li");
  li.className = kind;
  if (t !== undefined && t !== null) {
    const time = document.createElement("time");
    time.textContent = fmtTime(t);
    li.appendChild(time);
  }
  li.appendChild(document.createTextNode(kind === "q" ? "You: " + text : text));
  const list = $("historyList");
  list.appendChild(li);
  while (list.children.length > 200) list.removeChild(list.firstChild);
  $("history").scrollTop = $("history").scrollHeight;
}

function speak(text) {
  if (!state.speech || !("speechSynthesis" in window) || !text.trim()) return;
  const u = new SpeechSynthesisUtterance(text);
  window.speechSynthesis.speak(u);
}

// ------------------------------------------------------------------ events
function onEvent(ev) {
  switch (ev.event) {
    case "hello": {
      const s = ev.status;
      state.watcherId = ev.watcher ?? null;
      claimControl();  // binds our lease to this connection (or takes control if nobody has it)
      state.prefix = s.must_reply_prefix || "";
      state.interval = s.frame_interval_s || 1;
      $("model").textContent = s.model;
      $("historyList").textContent = "";
      for (const r of s.recent_replies || []) addHistory("a", stripPrefix(r.text), r.t);
      $("cam").hidden = !!s.server.owns_source || !navigator.mediaDevices;
      break;
    }
    case "turn":
      if (ev.question) addHistory("q", ev.question, ev.t);
      break;
    case "token":
      if (state.streamingTurn !== ev.turn) {
        state.streamingTurn = ev.turn;
        state.streamingText = "";
      }
      state.streamingText += ev.text;
      showCaption(stripPrefix(state.streamingText), true);
      break;
    case "reply": {
      const text = stripPrefix(ev.text);
      state.streamingTurn = null;
      showCaption(text, false);
      addHistory("a", text, ev.t);
      speak(text);
      break;
    }
    case "silence":
      if (state.streamingTurn === ev.turn) {  // a streamed answer that turned out to say nothing
        state.streamingTurn = null;
        showCaption("", false);
      }
      break;
    case "stats":
      $("info").textContent = "turn " + (ev.turn + 1) + " · " + Math.round((ev.prefill_s + ev.decode_s + ev.vision_s) * 1000) +
        " ms · context " + ev.context_tokens + "/" + ev.max_context_tokens;
      break;
    case "error":
      toast("model error: " + ev.message + (ev.recovered ? " (the dialogue was reset)" : " (press Reset)"));
      break;
    case "reset":
      state.streamingTurn = null;
      showCaption("", false);
      addHistory("note", ev.reason === "error" ? "dialogue reset after an error" : "dialogue reset");
      if ("speechSynthesis" in window) window.speechSynthesis.cancel();
      break;
    case "source":
      if (ev.status !== "corrupt") toast(ev.message, 4000);
      break;
    case "control":
      if (!ev.controlled && !state.controllerId) claimControl();  // the controlling page went away
      break;
    case "closed":
      setConn("offline", "server stopped");
      break;
    default:  // dropped, evicted: nothing to show
      break;
  }
}

function connect() {
  const proto = location.protocol === "https:" ? "wss://" : "ws://";
  const ws = new WebSocket(proto + location.host + withToken("/api/events"));
  state.ws = ws;
  ws.onopen = () => { state.retryMs = 500; setConn("live", "live"); startLive(); };
  ws.onmessage = (msg) => {
    try { onEvent(JSON.parse(msg.data)); } catch (err) { console.error("bad event", err); }
  };
  ws.onclose = async () => {
    state.watcherId = null;  // the next connection gets a new id
    // A refused handshake reaches the page as a bare close: ask the API why.
    const probe = await api("GET", "/api/status").catch(() => ({ status: 0 }));
    if (probe.status === 401) {
      setConn("error", "not authorized: open this page as /#token=YOUR_TOKEN");
      return;
    }
    const wait = state.retryMs;
    state.retryMs = Math.min(state.retryMs * 2, 8000);
    setConn("offline", "reconnecting in " + Math.round(wait / 1000) + " s");
    setTimeout(connect, wait);
  };
}

// ------------------------------------------------------------------ live view
function startLive() {
  const img = $("live");
  img.onload = () => { img.hidden = false; $("waiting").hidden = true; };
  img.onerror = () => { setTimeout(startLive, 2000); };
  img.src = withToken("/api/stream.mjpeg?v=" + Date.now());
}

// ------------------------------------------------------------------ control
// One claim at a time: two in flight (page load and the hello event) would race, the second seeing the first's
// fresh lease as another screen's.
let claiming = null, claimAgain = false;
function claimControl() {
  if (claiming) {
    claimAgain = true;
    return claiming;
  }
  claiming = claimOnce().finally(() => {
    claiming = null;
    if (claimAgain) {
      claimAgain = false;
      claimControl();
    }
  });
  return claiming;
}

async function claimOnce() {
  const r = await api("POST", "/api/control", undefined, undefined,
                      state.watcherId !== null ? { "X-Edge-Duet-Watcher": String(state.watcherId) } : {});
  if (r.ok) {
    state.controllerId = r.data.controller_id;
    sessionStorage.setItem("edgeDuetController", state.controllerId);
  } else if (r.status === 409) {
    state.controllerId = null;
    sessionStorage.removeItem("edgeDuetController");
  }
  const watching = !state.controllerId;
  $("role").textContent = watching ? "watching: another screen controls" : "";
  for (const id of ["question", "send", "reset", "cam", "mustReply"]) $(id).disabled = watching;
}

async function ask(e) {
  e.preventDefault();
  const text = $("question").value.trim();
  if (!text) return;
  const r = await api("POST", "/api/questions", JSON.stringify({ text, must_reply: $("mustReply").checked }), "application/json");
  if (r.ok) {
    $("question").value = "";
  } else {
    toast((r.data && r.data.message) || "the question was not accepted (" + r.status + ")");
    if (r.status === 409) claimControl();
  }
}

async function toggleCamera() {
  if (state.cameraTimer) {
    clearInterval(state.cameraTimer);
    state.cameraTimer = null;
    const v = $("camera");
    if (v.srcObject) v.srcObject.getTracks().forEach((t) => t.stop());
    v.srcObject = null;
    $("cam").setAttribute("aria-pressed", "false");
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
  } catch (err) {
    toast("camera unavailable: " + err.message);
    return;
  }
  const v = $("camera");
  v.srcObject = stream;
  await v.play();
  const canvas = document.createElement("canvas");
  $("cam").setAttribute("aria-pressed", "true");
  state.cameraTimer = setInterval(() => {
    if (!v.videoWidth) return;
    canvas.width = v.videoWidth;
    canvas.height = v.videoHeight;
    canvas.getContext("2d").drawImage(v, 0, 0);
    canvas.toBlob((blob) => { if (blob) api("POST", "/api/frames", blob, "image/jpeg"); }, "image/jpeg", 0.8);
  }, Math.max(200, state.interval * 500));  // twice per frame interval: the server keeps the newest
}

function init() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    sessionStorage.setItem("edgeDuetToken", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);  // keep the token out of the address bar
  }
  state.token = sessionStorage.getItem("edgeDuetToken");
  state.controllerId = sessionStorage.getItem("edgeDuetController");

  const speakBtn = $("speak");
  const renderSpeech = () => {
    speakBtn.setAttribute("aria-pressed", String(state.speech));
    speakBtn.textContent = "Speech: " + (state.speech ? "on" : "off");
  };
  if (!("speechSynthesis" in window)) speakBtn.disabled = true;
  renderSpeech();
  speakBtn.onclick = () => {
    state.speech = !state.speech;
    localStorage.setItem("edgeDuetSpeech", state.speech ? "on" : "off");
    if (!state.speech && "speechSynthesis" in window) window.speechSynthesis.cancel();
    renderSpeech();
  };
  $("historyToggle").onclick = () => {
    const h = $("history");
    h.hidden = !h.hidden;
    $("historyToggle").setAttribute("aria-expanded", String(!h.hidden));
  };
  $("reset").onclick = async () => {
    const r = await api("POST", "/api/reset");
    if (!r.ok) toast((r.data && r.data.message) || "reset failed (" + r.status + ")");
  };
  $("full").onclick = () => {
    if (document.fullscreenElement) document.exitFullscreen();
    else document.documentElement.requestFullscreen().catch(() => toast("full screen is not allowed here"));
  };
  $("cam").onclick = toggleCamera;
  $("ask").onsubmit = ask;

  setConn("connecting", "connecting…");
  connect();
  claimControl();
  setInterval(claimControl, 10000);  // renews our lease; a watcher takes over once the controller's lease ends
  // closing the tab hands control on at once (the server also ends a lease when its WebSocket closes)
  window.addEventListener("pagehide", () => {
    if (state.controllerId) fetch("/api/control", { method: "DELETE", headers: authHeaders(), keepalive: true });
  });
}

document.addEventListener("DOMContentLoaded", init);
