// Server-side rendering: the views show their `initial` values and open
// nothing (the package's `node` entry).
import { createSSRApp } from 'vue'
import { renderToString } from 'vue/server-renderer'
import { createWindflow } from 'windflow-notify-clients'
import App from './App.vue'
import { pageProps } from './props'

export function render(search: string): Promise<string> {
  const app = createSSRApp(App, { ...pageProps(search) })
  app.use(
    createWindflow({
      url: 'ws://127.0.0.1:8000/ws',
      token: () => {
        throw new Error('no token is asked for on the server')
      },
    }),
  )
  return renderToString(app)
}
