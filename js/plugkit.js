// PlugKit frontend extension.
//
// ComfyUI shows a node's image outputs (ui.PreviewImage / PreviewMask) and its progress bar by
// itself, but it shows a text output (ui.PreviewText, e.g. PlugKitPluginSelector's scores) only
// for its own PreviewAny node. This extension does the same for PlugKit nodes: the text a node
// returns is shown, read-only, in a box at the bottom of the node. The box is never saved in the
// workflow and never sent to the server.
import { app } from "../../scripts/app.js";

const WIDGET_NAME = "plugkit_text";

function showText(node, text) {
  let widget = node.widgets?.find((w) => w.name === WIDGET_NAME);
  if (!widget) {
    const box = document.createElement("textarea");
    box.readOnly = true;
    box.className = "comfy-multiline-input";
    box.style.opacity = "0.85";
    box.dataset.plugkit = "text-output";
    widget = node.addDOMWidget(WIDGET_NAME, "plugkit_text", box, {
      getValue: () => box.value,
      setValue: (value) => {
        box.value = value;
      },
      serialize: false,
    });
    widget.serialize = false;
  }
  widget.value = text;
  const [w, h] = node.computeSize();
  node.setSize([Math.max(node.size[0], w), Math.max(node.size[1], h)]);
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "PlugKit.TextOutput",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("PlugKit")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (text == null || (Array.isArray(text) && text.length === 0)) return;
      showText(this, Array.isArray(text) ? text.join("\n") : String(text));
    };
  },
});
