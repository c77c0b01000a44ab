// The dashboard as a new user sees it, in headless Chromium: what it says
// without a token, its layout on a 390 px phone, long log lines, and the
// resync notice, which must not cover the logs.
import assert from 'node:assert/strict'
import { existsSync } from 'node:fs'
import { randomUUID } from 'node:crypto'
import { test } from 'node:test'
import { chromium, type Page } from 'playwright-core'
import { connectWriter, createDatabase, createDeployment, startServer, token, until, WAIT } from '../support/server.js'

const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium'
const skip = existsSync(CHROMIUM)
  ? false
  : `Chromium not found at ${CHROMIUM}: install it (apt-get install -y chromium) or set CHROMIUM; .ci/run does`

/** How many lines of text `selector`'s element takes. */
async function lines(page: Page, selector: string): Promise<number> {
  return page.locator(selector).first().evaluate((element) => {
    const range = document.createRange()
    range.selectNodeContents(element)
    return new Set([...range.getClientRects()].map((rect) => Math.round(rect.top))).size
  })
}

test('the dashboard reads right without a token, on a phone, with long lines and a resync', { skip, timeout: 120_000 }, async () => {
  const database = await createDatabase()
  // A retention of one second: the page's `since: 0` then meets pruned events, and the server says resync.
  process.env.WINDFLOW_EVENT_RETENTION = '1s'
  const server = await startServer(database).finally(() => delete process.env.WINDFLOW_EVENT_RETENTION)
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--headless', '--no-sandbox', '--disable-gpu'] })
  try {
    const origin = `http://127.0.0.1:${server.port}`

    // No token: nothing can arrive, and the page does not pretend otherwise.
    const bare = await browser.newPage({ viewport: { width: 1280, height: 700 } })
    await bare.goto(`${origin}/`)
    await bare.locator('#token-form').waitFor({ timeout: WAIT })
    const empty = await bare.locator('#empty').textContent()
    assert.match(empty ?? '', /Not connected/)
    assert.doesNotMatch(empty ?? '', /Waiting for events/)

    const sql = await connectWriter(database)
    const user = randomUUID()
    const name = 'a-deployment-with-a-rather-long-name-for-a-phone'
    const id = await createDeployment(sql, user, name)
    await until(async () => Number((await sql.query('SELECT upto FROM windflow_events_pruned')).rows[0].upto) > 0, 'pruning')

    const page = await browser.newPage({ viewport: { width: 390, height: 844 } })
    await page.goto(`${origin}/?token=${token(user)}`)
    await page.locator('#connection[data-state="open"]').waitFor({ timeout: WAIT })
    // Written live, after the page subscribed: the one-second retention cannot take them first.
    const long = `[INFO] ${'a long log line that goes on '.repeat(12)}end`
    await sql.query("UPDATE deployments SET status = 'deploying' WHERE id = $1", [id])
    await sql.query('INSERT INTO deployment_logs (deployment_id, message) VALUES ($1, $2)', [id, long])
    const card = page.locator(`[data-deployment-id="${id}"]`)
    await card.locator('.name', { hasText: name }).waitFor({ timeout: WAIT })

    // The resync notice shows, above the panes, covering nothing.
    const notice = page.locator('#notice')
    await notice.waitFor({ state: 'visible', timeout: WAIT })
    assert.match((await notice.textContent()) ?? '', /pruned/)
    const noticeBox = await notice.boundingBox()
    for (const pane of ['#logs', '#deployments']) {
      const box = await page.locator(pane).boundingBox()
      assert.ok(noticeBox && box && noticeBox.y + noticeBox.height <= box.y, `the notice is above ${pane}, not over it`)
    }

    // 390 px: the title on one line, the user id on one line, no word of the name broken.
    assert.equal(await lines(page, 'h1'), 1, 'the title takes one line')
    assert.equal(await lines(page, '#who'), 1, 'the user id takes one line')
    const broken = await card.locator('.name').evaluate((element) => {
      const text = element.firstChild as Text
      const words = [...text.data.matchAll(/[a-z]+/g)]
      return words.filter((word) => {
        const range = document.createRange()
        range.setStart(text, word.index!)
        range.setEnd(text, word.index! + word[0].length)
        return new Set([...range.getClientRects()].map((rect) => Math.round(rect.top))).size > 1
      }).map((word) => word[0])
    })
    assert.deepEqual(broken, [], 'no word of the name is split across lines')

    // A long log line wraps beside its time, not under it.
    const row = page.locator('#logs > div', { hasText: 'a long log line' }).last()
    await row.waitFor({ timeout: WAIT })
    const layout = await row.evaluate((element) => {
      const [time, text] = [...element.children].map((child) => child.getBoundingClientRect())
      const range = document.createRange()
      range.selectNodeContents(element.children[1])
      const starts = [...range.getClientRects()].map((rect) => Math.round(rect.left))
      return { timeRight: Math.round(time.right), textLeft: Math.round(text.left), starts }
    })
    assert.ok(layout.starts.length > 1, `it wraps: ${JSON.stringify(layout)}`)
    assert.ok(layout.starts.every((x) => x >= layout.timeRight), `every line starts right of the time: ${JSON.stringify(layout)}`)
    await sql.end()
  } finally {
    await browser.close()
    await server.stop()
    await database.drop()
  }
})
