// PlugKit: keep PlugKit's translations (locales/<lang>/) when the interface language changes.
//
// ComfyUI serves every custom node's locales/ at GET /i18n and the frontend merges them at start-up.
// Frontends up to 1.32 (the one ComfyUI 0.3.75 pins) then load a non-English language lazily and
// replace that language's messages, dropping what was merged (fixed upstream in
// Comfy-Org/ComfyUI_frontend#7214): PlugKit's Chinese node names would never show. This extension
// merges PlugKit's entries again once the language's own messages are there, then asks the frontend
// to re-translate the node definitions. It does nothing when they are already present (fixed
// frontends, English), touches only PlugKit's node entries, and stops after a bounded number of tries.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const PROBE_NODE = "PlugKitFreeU";
const TRIES = 40; // x 500 ms: the language's messages load within a few seconds of a change

function i18nInstance() {
  const vueApp = document.querySelector("#vue-app")?.__vue_app__;
  const provides = vueApp?._context?.provides;
  if (!provides) return null;
  for (const key of Reflect.ownKeys(provides)) {
    const v = provides[key];
    if (v?.global && typeof v.global.mergeLocaleMessage === "function" && typeof v.global.te === "function") {
      return v.global;
    }
  }
  return null;
}

function ourMessages(all, locale) {
  const msgs = all?.[locale];
  if (!msgs?.nodeDefs) return null;
  const nodeDefs = Object.fromEntries(Object.entries(msgs.nodeDefs).filter(([id]) => id.startsWith("PlugKit")));
  if (!Object.keys(nodeDefs).length) return null;
  return { nodeDefs, ...(msgs.nodeCategories ? { nodeCategories: msgs.nodeCategories } : {}) };
}

let served = null; // GET /i18n, fetched once
let running = false;

async function restore() {
  if (running) return;
  running = true;
  try {
    for (let i = 0; i < TRIES; i++) {
      const i18n = i18nInstance();
      const locale = i18n ? String(i18n.locale?.value ?? i18n.locale) : null;
      if (!i18n || !locale || locale === "en") return;
      const key = `nodeDefs.${PROBE_NODE}.display_name`;
      // Wait until the language's own messages are loaded (a core key is present), then check ours.
      if (i18n.te("g.about", locale)) {
        if (i18n.te(key, locale)) return;
        served ??= await (await api.fetchApi("/i18n")).json();
        const ours = ourMessages(served, locale);
        if (!ours) return; // PlugKit has no translation for this language
        i18n.mergeLocaleMessage(locale, ours);
        await app.extensionManager?.command?.execute?.("Comfy.RefreshNodeDefinitions");
        return;
      }
      await new Promise((r) => setTimeout(r, 500));
    }
  } catch (e) {
    console.warn("PlugKit: could not restore the translations", e);
  } finally {
    running = false;
  }
}

app.registerExtension({
  name: "PlugKit.I18n",
  async setup() {
    restore();
    app.ui?.settings?.addEventListener?.("Comfy.Locale.change", () => restore());
  },
});
