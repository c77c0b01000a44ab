// The live dashboard served at `/`. It knows deployments only from events:
// on load it subscribes to `deployment_events` with `since: 0`, which
// replays what the server's event log holds, then follows live. The log
// pane follows the selected deployment's `deployment_logs_{id}` topic.
import { WindflowClient } from '/client.js'

const MAX_LOG_LINES = 2000
const STATUS_TEXT = {
  open: 'live',
  connecting: 'connecting…',
  reconnecting: 'reconnecting…',
  unauthorized: 'token refused',
  closed: 'not connected',
}

const $ = (id) => document.getElementById(id)
/** deployment id -> { id, name, status, userId, progress, step, totalSteps, error, logs: [] } */
const deployments = new Map()
let selected = null
let client = null
/** The token's claims (`is_superuser`, `organization_id`), read for labels only: the server verifies it. */
let viewer = {}

/** The claims of a JWT, without verifying it; {} when it is not one. */
function claimsOf(token) {
  try {
    const payload = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/')
    return JSON.parse(atob(payload)) ?? {}
  } catch {
    return {}
  }
}

/**
 * Why this user sees `deployment`: they own it; or they are a superuser;
 * or else it belongs to their organization, the only other way an event
 * reaches them. (Events do not carry the organization, so a superuser's
 * own organization is not told apart from any other.)
 */
function relation(deployment) {
  if (!deployment.userId) return null
  if (deployment.userId === client?.userId) return { kind: 'yours', text: 'yours' }
  if (viewer.is_superuser === true) return { kind: 'superuser', text: 'visible as superuser' }
  return { kind: 'organization', text: 'your organization' }
}

/** Enough of the id to tell two deployments of one name apart. */
const shortId = (id) => id.slice(0, 8)

function takeToken() {
  const params = new URLSearchParams(location.search)
  const fromUrl = params.get('token')
  if (fromUrl) {
    // Keep it for reloads of this tab, but out of the address bar and history.
    sessionStorage.setItem('windflow-token', fromUrl)
    params.delete('token')
    const query = params.toString()
    history.replaceState(null, '', location.pathname + (query ? `?${query}` : '') + location.hash)
    return fromUrl
  }
  return sessionStorage.getItem('windflow-token')
}

/** What the empty list says: only "waiting" when something can arrive. */
function showEmpty(html) {
  $('empty').innerHTML = html
}

function start(token) {
  client?.close()
  $('token-form').hidden = true
  showEmpty('Connecting…')
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws'
  viewer = claimsOf(token)
  client = new WindflowClient({ url: `${scheme}://${location.host}/ws`, token })
  client.on('state', showState)
  client.on('authenticated', (data) => {
    sessionStorage.setItem('windflow-token', token)
    $('who').textContent = `user ${data.user_id}`
    $('who').title = data.user_id
    showEmpty('Waiting for events… write a row to <code>deployments</code> and it appears here.')
  })
  client.on('close', ({ code }) => {
    if (code === 1008) askForToken('The server refused this token (invalid or expired). Paste a fresh one.')
  })
  client.on('resync', ({ topic }) => notice(`Some older events of ${topic} were pruned from the event log; showing what it still holds.`))
  client.on('error', (error) => notice(`${error.code}: ${error.message}`))
  client.on('DEPLOYMENT_STATUS_CHANGED', (data) => {
    const deployment = upsert(data.deployment_id)
    deployment.name = data.name
    deployment.status = data.status
    deployment.userId = data.user_id
    deployment.error = data.error_message
    if (data.status === 'pending') deployment.progress = 0
    render(deployment)
  })
  client.on('DEPLOYMENT_PROGRESS', (data) => {
    const deployment = upsert(data.deployment_id)
    deployment.progress = data.progress
    deployment.step = data.current_step
    deployment.totalSteps = data.total_steps
    render(deployment)
  })
  client.on('DEPLOYMENT_LOGS_UPDATE', (data) => {
    const deployment = upsert(data.deployment_id)
    const line = { time: data.timestamp, text: data.logs }
    deployment.logs.push(line)
    if (deployment.logs.length > MAX_LOG_LINES) deployment.logs.shift()
    if (deployment.id === selected) appendLog(line)
  })
  client.subscribe('deployment_events', { since: 0 })
  client.connect()
}

function upsert(id) {
  let deployment = deployments.get(id)
  if (!deployment) {
    deployment = { id, name: id.slice(0, 8), status: 'pending', userId: null, progress: 0, step: null, totalSteps: null, error: null, logs: [] }
    deployments.set(id, deployment)
    $('empty').hidden = true
    $('count').textContent = `(${deployments.size})`
    $('deployments').append(card(deployment))
    if (!selected) select(id)
  }
  return deployment
}

function card(deployment) {
  const item = document.createElement('li')
  item.className = 'deployment'
  item.dataset.deploymentId = deployment.id
  item.innerHTML = `
    <div class="top"><span class="name"></span><code class="short-id"></code><span class="owner" hidden></span><span class="status"></span></div>
    <div class="progress"><div class="progress-bar"></div></div>
    <div class="step"><span class="current-step"></span><span class="percent"></span></div>
    <div class="failure" hidden></div>`
  item.addEventListener('click', () => select(deployment.id))
  return item
}

function render(deployment) {
  const item = document.querySelector(`[data-deployment-id="${deployment.id}"]`)
  if (!item) return
  item.querySelector('.name').textContent = deployment.name
  const shortIdElement = item.querySelector('.short-id')
  shortIdElement.textContent = shortId(deployment.id)
  shortIdElement.title = deployment.id
  const owner = item.querySelector('.owner')
  const seenAs = relation(deployment)
  owner.hidden = !seenAs
  owner.textContent = seenAs?.text ?? ''
  owner.dataset.relation = seenAs?.kind ?? ''
  const status = item.querySelector('.status')
  status.textContent = deployment.status.replace('_', ' ')
  status.dataset.status = deployment.status
  const bar = item.querySelector('.progress-bar')
  bar.style.width = `${deployment.progress}%`
  bar.dataset.progress = String(deployment.progress)
  bar.dataset.status = deployment.status
  item.querySelector('.current-step').textContent = deployment.step ?? ''
  item.querySelector('.percent').textContent = `${deployment.progress}%`
  const failure = item.querySelector('.failure')
  failure.hidden = !(deployment.status === 'failed' && deployment.error)
  failure.textContent = deployment.error ?? ''
  if (deployment.id === selected) $('logs-title').textContent = logsTitle(deployment)
}

const logsTitle = (deployment) => `· ${deployment.name} (${shortId(deployment.id)})`

function select(id) {
  if (selected === id) return
  if (selected) client.unsubscribe(`deployment_logs_${selected}`)
  selected = id
  for (const item of document.querySelectorAll('.deployment')) {
    item.classList.toggle('selected', item.dataset.deploymentId === id)
  }
  const deployment = deployments.get(id)
  $('logs-title').textContent = logsTitle(deployment)
  $('logs').replaceChildren()
  for (const line of deployment.logs) appendLog(line)
  // The log topic of this one deployment, from the start of its history:
  // lines already shown are dropped by the client's de-duplication.
  client.subscribe(`deployment_logs_${id}`, { since: 0 })
}

function appendLog({ time, text }) {
  const pane = $('logs')
  const following = pane.scrollHeight - pane.scrollTop - pane.clientHeight < 40
  const row = document.createElement('div')
  if (/\[(ERROR|FATAL)\]/.test(text)) row.className = 'line-error'
  const stamp = document.createElement('span')
  stamp.className = 'line-time'
  stamp.textContent = `${(time ?? '').slice(11, 19)}  `
  // A column of its own: a long line wraps beside the time, not under it.
  const message = document.createElement('span')
  message.className = 'line-text'
  message.textContent = text.replace(/\n$/, '')
  row.append(stamp, message)
  pane.append(row)
  while (pane.childElementCount > MAX_LOG_LINES) pane.firstElementChild.remove()
  if (following) pane.scrollTop = pane.scrollHeight
}

function showState(state) {
  $('connection').dataset.state = state
  $('connection-text').textContent = STATUS_TEXT[state] ?? state
}

function askForToken(message) {
  $('token-form').hidden = false
  showEmpty('Not connected: nothing can arrive until a token is accepted. Paste one above.')
  const error = $('token-error')
  error.hidden = !message
  error.textContent = message ?? ''
}

let noticeTimer = null
function notice(text) {
  const element = $('notice')
  element.textContent = text
  element.hidden = false
  clearTimeout(noticeTimer)
  noticeTimer = setTimeout(() => { element.hidden = true }, 6000)
}

$('token-form').addEventListener('submit', (event) => {
  event.preventDefault()
  const token = $('token-input').value.trim()
  if (token) start(token)
})

const token = takeToken()
if (token) start(token)
else askForToken()
