import { defineConfig } from "vite";

// The build lands in the Go package that embeds it, so "go build" needs no
// Node.js. The admin listener serves it under /ui/.
export default defineConfig({
  base: "/ui/",
  build: {
    outDir: "../admin/uiassets",
    emptyOutDir: true,
    target: "es2022",
    // The polyfill is not needed by current browsers and would add code.
    modulePreload: { polyfill: false },
    // Inlined assets would become data: URLs; the page's CSP allows those
    // for images only.
    assetsInlineLimit: 0,
    sourcemap: false,
    reportCompressedSize: true,
  },
});
