import { createApp } from 'vue'
import { createWindflow } from 'windflow-notify-clients'
import App from './App.vue'
import { pageProps } from './props'

const params = new URLSearchParams(location.search)
// The token, as an app keeps it: a function asked before each connection.
// The browser tests read how often it was asked, and change it.
const fixture = { token: params.get('token') ?? '', asked: 0 }
Object.assign(window, { fixture })

const windflow = createWindflow({
  url: params.get('url') ?? undefined, // default: /ws on this host, proxied by vite.config.ts
  token: () => {
    fixture.asked += 1
    return fixture.token
  },
})

createApp(App, { ...pageProps(location.search) })
  .use(windflow)
  .mount('#app')
