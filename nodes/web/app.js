// chatsim web client. One browser tab is one device: the login answer's token and device id
// are kept in sessionStorage, which is per tab. The page speaks the api node's HTTP API (same
// origin) and the chat server's WebSocket protocol (nodes/src/proto/client.rs):
//  - messages are kept per channel by the server's `seq`, so history pages, sync answers and
//    live deliveries merge without duplicates and show in the channel's one order;
//  - a send keeps its `client_msg_id` until acknowledged and is resent with it after a
//    reconnect (the server deduplicates), shown as pending until then;
//  - heartbeats every 5 s; a connection silent for three intervals is treated as dead;
//    reconnects back off exponentially with jitter and resync from the cursors.
// Ids are JSON numbers. Users, devices, channels, seqs, presence versions and our own
// client_msg_ids stay below 2^53 and are exact; Snowflake message_ids may not be, so nothing
// here relies on them.
'use strict';

const HEARTBEAT_MS = 5000; // limits.rs HEARTBEAT_INTERVAL_MS
const DEAD_AFTER_MS = 3 * HEARTBEAT_MS; // the proto's rule for a silent connection
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 15000;
const HISTORY_PAGE = 100; // limits.rs SYNC_PAGE_MAX
const SESSION_KEY = 'chatsim.session';
// Error codes (proto ErrorCode): a send refused with these may succeed unchanged later.
const RETRYABLE = new Set(['unavailable', 'rate_limited']);
// The server closes the connection after these; the session cannot go on.
const SESSION_OVER = new Set(['bad_token', 'token_expired', 'token_revoked', 'not_authenticated']);

const $ = (id) => document.getElementById(id);

const st = {
  session: null, // {name, user, device, token}
  names: new Map(), // user id -> name
  nameLookups: new Set(),
  channels: new Map(), // channel id -> channel view (see ensureChannel)
  friends: new Map(), // friend user id -> direct channel id
  requests: [], // users who asked to be friends, waiting for an answer
  invites: [], // group channels this user is invited to
  outbox: new Map(), // client_msg_id -> {channel, text, state: pending|retry|failed, code}
  presence: new Map(), // user id -> {status, version}
  selected: null,
  ws: null,
  welcomed: false,
  server: null, // the chat server of the current connection
  avoid: null, // a server we just failed to reach: ask discovery for another
  connNo: 0,
  lastFrameAt: 0,
  backoffMs: BACKOFF_MIN_MS,
  reconnectTimer: null,
  tickTimer: null,
  stopped: true,
  lastCmid: 0,
};

// ------------------------------------------------------------------ errors and HTTP

class ApiError extends Error {
  constructor(code, detail) {
    super(code + ': ' + detail);
    this.code = code;
    this.detail = detail;
  }
}

function showError(code, detail) {
  $('error-text').textContent = detail ? code + ': ' + detail : code;
  $('error').dataset.code = code;
  $('error').hidden = false;
}

function clearError() {
  $('error').hidden = true;
  delete $('error').dataset.code;
}

function report(e) {
  if (e instanceof ApiError) {
    showError(e.code, e.detail);
    if (SESSION_OVER.has(e.code) && st.session) endSession();
  } else {
    showError('client_error', String(e));
  }
}

async function api(method, path, body) {
  const headers = { 'content-type': 'application/json' };
  if (st.session) headers.authorization = 'Bearer ' + st.session.token;
  let resp;
  try {
    resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    throw new ApiError('network', 'the api did not answer (' + e.message + ')');
  }
  const text = await resp.text();
  let data = null;
  try { data = JSON.parse(text); } catch (_) { /* not JSON: an error page */ }
  if (!resp.ok) {
    throw new ApiError(data && data.error ? data.error : 'http_' + resp.status, data ? data.detail : text);
  }
  return data;
}

// ------------------------------------------------------------------ session (one tab = one device)

async function login(name, password) {
  // Logging in again in this tab (after an expiry) keeps its device id.
  const old = loadSession();
  const device = old && old.name === name ? old.device : undefined;
  const r = await api('POST', '/v1/login', { name, password, device });
  st.session = { name, user: r.user, device: r.device, token: r.token };
  sessionStorage.setItem(SESSION_KEY, JSON.stringify(st.session));
  startSession();
}

function loadSession() {
  try { return JSON.parse(sessionStorage.getItem(SESSION_KEY)); } catch (_) { return null; }
}

function startSession() {
  st.names.set(st.session.user, st.session.name);
  $('whoami').textContent = st.session.name + ' (device ' + st.session.device + ')';
  for (const id of ['whoami', 'conn', 'logout', 'chat-view']) $(id).hidden = false;
  $('auth-view').hidden = true;
  st.stopped = false;
  st.tickTimer = setInterval(tick, HEARTBEAT_MS);
  refreshProfile().catch(report);
  connect();
}

function endSession() {
  st.stopped = true;
  clearInterval(st.tickTimer);
  clearTimeout(st.reconnectTimer);
  if (st.ws) { const ws = st.ws; st.ws = null; ws.close(); }
  sessionStorage.removeItem(SESSION_KEY);
  st.session = null;
  st.channels.clear(); st.friends.clear(); st.outbox.clear(); st.presence.clear();
  st.selected = null;
  for (const id of ['whoami', 'conn', 'logout', 'chat-view']) $(id).hidden = true;
  $('auth-view').hidden = false;
  render();
}

// ------------------------------------------------------------------ profile, names, channels

function ensureChannel(id, info) {
  let c = st.channels.get(id);
  if (!c) {
    // msgs: seq -> message; cursor: last seq with nothing missing before it.
    c = { id, kind: 'group', name: '', members: [], peer: null, msgs: new Map(), cursor: 0,
      reported: 0, history: false, unread: 0, gapSince: 0 };
    st.channels.set(id, c);
  }
  Object.assign(c, info);
  return c;
}

async function refreshProfile() {
  const p = await api('GET', '/v1/me');
  const fresh = [];
  for (const [friend, ch] of Object.entries(p.friends)) {
    const user = Number(friend);
    if (!st.friends.has(user)) fresh.push(user);
    st.friends.set(user, ch);
    ensureChannel(ch, { kind: 'direct', peer: user, members: [st.session.user, user] });
    nameOf(user);
  }
  for (const ch of p.channels) {
    const c = st.channels.get(ch);
    if (!c || (c.kind === 'group' && !c.members.length)) await loadChannelInfo(ch);
  }
  st.requests = p.friend_requests || [];
  st.requests.forEach(nameOf);
  st.invites = p.group_invites || [];
  for (const ch of st.invites) {
    if (!st.inviteNames) st.inviteNames = new Map();
    if (!st.inviteNames.has(ch)) {
      const info = await api('GET', '/v1/channels/' + ch);
      st.inviteNames.set(ch, info.name);
    }
  }
  if (fresh.length) queryPresence(fresh);
  render();
}

// Becomes friends with `user` (accepting their request) or asks them to be friends.
async function addFriend(user) {
  const r = await api('POST', '/v1/friends', { user });
  await refreshProfile();
  const notice = $('friend-notice');
  if (r.status === 'requested') {
    notice.textContent = 'Asked ' + nameOf(user) + ' to be friends: you are friends once they add you too.';
    notice.hidden = false;
    return;
  }
  notice.hidden = true;
  queryPresence([user]);
  select(r.channel);
}

async function loadChannelInfo(ch) {
  const info = await api('GET', '/v1/channels/' + ch);
  ensureChannel(ch, { kind: info.kind, name: info.name, members: info.members });
  info.members.forEach(nameOf);
}

function nameOf(user) {
  if (st.names.has(user)) return st.names.get(user);
  if (!st.nameLookups.has(user) && st.session) {
    st.nameLookups.add(user);
    api('GET', '/v1/users/' + user)
      .then((u) => { st.names.set(user, u.name); render(); })
      .catch(() => st.nameLookups.delete(user));
  }
  return 'user ' + user;
}

async function findUser(name) {
  return (await api('GET', '/v1/users?name=' + encodeURIComponent(name))).user;
}

// ------------------------------------------------------------------ messages

// Adds a committed message; false if it was already there (a duplicate).
function addMessage(m) {
  const c = ensureChannel(m.channel, {});
  if (c.msgs.has(m.seq) || m.seq <= 0) return false;
  c.msgs.set(m.seq, m);
  while (c.msgs.has(c.cursor + 1)) c.cursor++;
  // Our own message found by sync or history: it is committed, so the send is answered.
  if (m.sender_device === st.session.device) st.outbox.delete(m.client_msg_id);
  else if (st.selected !== c.id && m.seq > c.reported) c.unread++;
  return true;
}

function hasGap(c) {
  for (const seq of c.msgs.keys()) if (seq > c.cursor + 1) return true;
  return false;
}

async function loadHistory(c) {
  let after = 0;
  for (;;) {
    const page = await api('GET', '/v1/channels/' + c.id + '/messages?after_seq=' + after + '&limit=' + HISTORY_PAGE);
    page.messages.forEach(addMessage);
    if (page.messages.length < HISTORY_PAGE) break;
    after = page.messages[page.messages.length - 1].seq;
  }
  c.history = true;
  render();
}

function nextCmid() {
  // Unique per device, below 2^53 so JSON numbers stay exact in JavaScript.
  st.lastCmid = Math.max(st.lastCmid + 1, Date.now() * 1000);
  return st.lastCmid;
}

function sendText(channel, text) {
  const id = nextCmid();
  st.outbox.set(id, { channel, text, state: 'pending', code: null });
  sendFrame({ type: 'send', client_msg_id: id, channel, text });
  render();
}

// ------------------------------------------------------------------ WebSocket

function sendFrame(f) {
  if (!st.ws || st.ws.readyState !== WebSocket.OPEN) return false;
  if (f.type !== 'hello' && !st.welcomed) return false;
  st.ws.send(JSON.stringify(f));
  return true;
}

function setConn(state, text) {
  $('conn').dataset.state = state;
  $('conn').textContent = text || state;
}

async function connect() {
  if (st.stopped) return;
  setConn('connecting', 'connecting…');
  let url;
  try {
    const q = st.avoid !== null ? '?avoid=' + st.avoid : '';
    const r = await api('GET', '/v1/chat-server' + q);
    url = r.url;
    st.server = r.server;
  } catch (e) {
    if (e instanceof ApiError && SESSION_OVER.has(e.code)) return report(e);
    return scheduleReconnect(e.code || 'network');
  }
  if (st.stopped) return;
  const ws = new WebSocket(url);
  st.ws = ws;
  st.welcomed = false;
  ws.onopen = () => {
    st.lastFrameAt = Date.now();
    // Connection numbers order this device's connections: a newer one replaces an older.
    st.connNo = Math.max(st.connNo + 1, Date.now());
    sendFrame({ type: 'hello', token: st.session.token, connection: st.connNo });
  };
  ws.onmessage = (ev) => {
    if (ws !== st.ws) return;
    st.lastFrameAt = Date.now();
    let f;
    try { f = JSON.parse(ev.data); } catch (_) { return showError('bad_frame', String(ev.data).slice(0, 200)); }
    onFrame(f);
  };
  ws.onclose = () => {
    if (ws !== st.ws) return;
    if (!st.welcomed) st.avoid = st.server;
    dropConnection('connection closed');
  };
}

function dropConnection(why) {
  const ws = st.ws;
  st.ws = null;
  st.welcomed = false;
  if (ws) ws.close();
  scheduleReconnect(why);
}

function scheduleReconnect(why) {
  if (st.stopped) return;
  clearTimeout(st.reconnectTimer);
  const wait = Math.round(st.backoffMs * (0.5 + Math.random() / 2));
  setConn('offline', 'offline (' + why + '), retrying in ' + Math.ceil(wait / 1000) + ' s');
  st.backoffMs = Math.min(st.backoffMs * 2, BACKOFF_MAX_MS);
  st.reconnectTimer = setTimeout(connect, wait);
}

function onWelcome() {
  st.welcomed = true;
  st.avoid = null;
  st.backoffMs = BACKOFF_MIN_MS;
  setConn('online', 'connected to chat server ' + st.server);
  sendFrame({ type: 'heartbeat' });
  const cursors = [...st.channels.values()].map((c) => ({ channel: c.id, seq: c.cursor }));
  sendFrame({ type: 'sync', cursors });
  for (const [id, o] of st.outbox) {
    if (o.state !== 'failed') sendFrame({ type: 'send', client_msg_id: id, channel: o.channel, text: o.text });
  }
  queryPresence([...st.friends.keys()]);
}

function onFrame(f) {
  switch (f.type) {
    case 'welcome': return onWelcome();
    case 'ack': return onAck(f);
    case 'message':
      if (!st.channels.has(f.channel)) refreshProfile().catch(report);
      if (addMessage(f)) render();
      return;
    case 'synced': return;
    case 'heartbeat_ack': return;
    case 'presence_refresh': return queryPresence([...st.friends.keys()]);
    case 'presence': return onPresence(f);
    case 'error': return onError(f);
    default: return showError('unknown_frame', f.type);
  }
}

function onAck(f) {
  const o = st.outbox.get(f.client_msg_id);
  if (!o) return; // A late ack of a retry: already answered.
  st.outbox.delete(f.client_msg_id);
  const s = st.session;
  addMessage({ channel: f.channel, seq: f.seq, message_id: f.message_id, sender: s.user, sender_device: s.device,
    client_msg_id: f.client_msg_id, text: o.text, sent_at_ms: Date.now() });
  render();
}

function onPresence(f) {
  const old = st.presence.get(f.user);
  if (old && old.version > f.version) return; // An answer older than the one shown.
  st.presence.set(f.user, { status: f.status, version: f.version });
  render();
}

function onError(f) {
  const o = f.client_msg_id != null ? st.outbox.get(f.client_msg_id) : null;
  if (o && RETRYABLE.has(f.code)) {
    o.state = 'retry'; // Resent at the next tick with the same client_msg_id.
  } else if (o) {
    o.state = 'failed';
    o.code = f.code;
    showError(f.code, f.detail);
  } else if (SESSION_OVER.has(f.code)) {
    showError(f.code, f.detail + ' (log in again)');
    endSession();
  } else if (f.code === 'session_replaced') {
    // Another tab holds this device (a duplicated tab shares its sessionStorage).
    st.stopped = true;
    setConn('stopped', 'disconnected: this device connected elsewhere');
    showError(f.code, f.detail + ' (another tab uses this device; log out and in for a new one)');
  } else {
    showError(f.code, f.detail);
  }
  render();
}

function queryPresence(users) {
  if (users.length) sendFrame({ type: 'presence_query', users });
}

// Once per heartbeat interval: heartbeat, liveness, retries, gap syncs, cursor reports.
function tick() {
  if (st.ws && Date.now() - st.lastFrameAt > DEAD_AFTER_MS) return dropConnection('no answer for 15 s');
  if (!st.welcomed) return;
  sendFrame({ type: 'heartbeat' });
  for (const [id, o] of st.outbox) {
    if (o.state === 'retry') {
      o.state = 'pending';
      sendFrame({ type: 'send', client_msg_id: id, channel: o.channel, text: o.text });
    }
  }
  const gaps = [...st.channels.values()].filter(hasGap).map((c) => ({ channel: c.id, seq: c.cursor }));
  if (gaps.length) sendFrame({ type: 'sync', cursors: gaps });
  for (const c of st.channels.values()) {
    if (c.cursor > c.reported) {
      sendFrame({ type: 'read', channel: c.id, seq: c.cursor });
      c.reported = c.cursor;
    }
  }
  // New friends and groups made by others show up here (the api pushes nothing).
  refreshProfile().catch(report);
}

// ------------------------------------------------------------------ rendering

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k.startsWith('data-') || k.startsWith('aria-') || k === 'type' || k === 'role') e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const ch of children) e.append(ch);
  return e;
}

function channelTitle(c) {
  return c.kind === 'direct' ? nameOf(c.peer) : (c.name || 'group ' + c.id);
}

function render() {
  if (!st.session) { $('friends').replaceChildren(); $('friend-requests').replaceChildren(); $('group-invites').replaceChildren(); $('groups').replaceChildren(); $('messages').replaceChildren(); return; }
  const item = (c, extra) => {
    const b = el('button', { type: 'button', 'data-channel': c.id, 'aria-current': String(st.selected === c.id) },
      ...extra, el('span', { className: 'label', textContent: channelTitle(c) }));
    if (c.unread) b.append(el('span', { className: 'badge', 'aria-label': c.unread + ' unread', textContent: String(c.unread) }));
    b.onclick = () => select(c.id);
    return el('li', {}, b);
  };
  const friends = [...st.friends].map(([user, ch]) => {
    const status = (st.presence.get(user) || { status: 'offline' }).status;
    const dot = el('span', { className: 'dot', 'data-presence': status, role: 'img', 'aria-label': status });
    const li = item(st.channels.get(ch), [dot]);
    li.firstChild.dataset.user = user;
    li.firstChild.dataset.presence = status;
    return li;
  });
  $('friends').replaceChildren(...friends);
  const requests = st.requests.map((user) => {
    const accept = el('button', { type: 'button', className: 'accept', textContent: 'Accept' });
    accept.dataset.user = user;
    accept.onclick = () => addFriend(user).catch(report);
    const decline = el('button', { type: 'button', className: 'decline', textContent: 'Decline' });
    decline.onclick = () => api('DELETE', '/v1/friend-requests/' + user).then(refreshProfile).catch(report);
    return el('li', {}, el('span', { className: 'label', textContent: nameOf(user) + ' wants to be friends' }), accept, decline);
  });
  $('friend-requests').replaceChildren(...requests);
  const invites = st.invites.map((ch) => {
    const join = el('button', { type: 'button', className: 'join', textContent: 'Join' });
    join.onclick = async () => {
      try {
        await api('POST', '/v1/groups/' + ch + '/join');
        await loadChannelInfo(ch);
        await refreshProfile();
        select(ch);
      } catch (e) { report(e); }
    };
    const decline = el('button', { type: 'button', className: 'decline', textContent: 'Decline' });
    decline.onclick = () => api('DELETE', '/v1/groups/' + ch + '/invitation').then(refreshProfile).catch(report);
    const name = (st.inviteNames && st.inviteNames.get(ch)) || 'group ' + ch;
    return el('li', {}, el('span', { className: 'label', textContent: 'Invited to ' + name }), join, decline);
  });
  $('group-invites').replaceChildren(...invites);
  const groups = [...st.channels.values()].filter((c) => c.kind === 'group').map((c) => item(c, []));
  $('groups').replaceChildren(...groups);
  renderConversation();
}

function renderConversation() {
  const c = st.selected !== null ? st.channels.get(st.selected) : null;
  $('composer').hidden = !c;
  $('member-form').hidden = !c || c.kind !== 'group';
  if (!c) { $('conv-title').textContent = 'Pick a conversation'; $('conv-members').textContent = ''; return; }
  $('conv-title').textContent = channelTitle(c);
  $('conv-title').dataset.channel = c.id;
  $('conv-members').textContent = 'Members: ' + c.members.map(nameOf).join(', ');
  const seqs = [...c.msgs.keys()].sort((a, b) => a - b);
  const items = seqs.map((seq) => messageItem(c.msgs.get(seq), 'acked', null));
  for (const [id, o] of st.outbox) {
    if (o.channel === c.id) items.push(messageItem({ sender: st.session.user, client_msg_id: id, text: o.text }, o.state, o.code));
  }
  const list = $('messages');
  const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 4;
  list.replaceChildren(...items);
  if (atBottom) list.scrollTop = list.scrollHeight;
}

function messageItem(m, state, code) {
  const mine = m.sender === st.session.user;
  const shown = state === 'retry' ? 'pending' : state;
  const when = m.sent_at_ms ? new Date(m.sent_at_ms).toLocaleTimeString() : '';
  const status = shown === 'acked' ? (mine ? 'sent' : '') : shown === 'pending' ? 'sending…' : 'not sent: ' + code;
  const meta = [nameOf(m.sender), when, m.seq ? '#' + m.seq : '', status].filter(Boolean).join(' · ');
  const attrs = { 'data-state': shown, 'data-mine': String(mine), 'data-cmid': m.client_msg_id };
  if (m.seq) attrs['data-seq'] = m.seq;
  const li = el('li', attrs, el('div', { className: 'meta', textContent: meta }), el('div', { className: 'text', textContent: m.text }));
  if (shown === 'failed') {
    const discard = el('button', { type: 'button', className: 'discard', textContent: 'Discard' });
    discard.onclick = () => { st.outbox.delete(m.client_msg_id); render(); };
    li.append(discard);
  }
  return li;
}

function select(id) {
  st.selected = id;
  const c = st.channels.get(id);
  c.unread = 0;
  render();
  if (!c.history) loadHistory(c).catch(report);
  $('composer-text').focus();
}

// ------------------------------------------------------------------ forms

function onSubmit(id, handler) {
  $(id).addEventListener('submit', (ev) => {
    ev.preventDefault();
    clearError();
    Promise.resolve(handler(ev)).catch(report);
  });
}

function wire() {
  onSubmit('auth-form', async (ev) => {
    const name = $('auth-name').value.trim();
    const password = $('auth-password').value;
    if (ev.submitter && ev.submitter.value === 'signup') await api('POST', '/v1/signup', { name, password });
    await login(name, password);
    $('auth-password').value = '';
  });
  onSubmit('friend-form', async () => {
    const user = await findUser($('friend-name').value.trim());
    $('friend-name').value = '';
    await addFriend(user);
  });
  onSubmit('group-form', async () => {
    const names = $('group-members').value.split(/[\s,]+/).filter(Boolean);
    const members = [];
    for (const n of names) members.push(await findUser(n));
    const r = await api('POST', '/v1/groups', { name: $('group-name').value.trim(), members });
    $('group-name').value = '';
    $('group-members').value = '';
    await loadChannelInfo(r.channel);
    select(r.channel);
  });
  onSubmit('member-form', async () => {
    const user = await findUser($('member-name').value.trim());
    const r = await api('POST', '/v1/groups/' + st.selected + '/members', { user });
    $('member-name').value = '';
    ensureChannel(r.channel, { members: r.members });
    r.members.forEach(nameOf);
    render();
  });
  onSubmit('composer', () => {
    const text = $('composer-text').value;
    if (!text.trim() || st.selected === null) return;
    $('composer-text').value = '';
    sendText(st.selected, text);
  });
  $('composer-text').addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && !ev.shiftKey) { ev.preventDefault(); $('composer').requestSubmit(); }
  });
  $('error-dismiss').onclick = clearError;
  $('logout').onclick = () => {
    sendFrame({ type: 'logout' });
    endSession();
  };
  const saved = loadSession();
  if (saved && saved.token) { st.session = saved; startSession(); }
}

document.addEventListener('DOMContentLoaded', wire);
