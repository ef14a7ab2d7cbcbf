// Shows TuneKit's training progress (step and loss) on the Train LoRA node while it trains.
// The server sends "tunekit.progress" events (nodes/host.py); this file only displays them.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TRAIN_NODE = "TuneKitTrainLoRA";

function showProgress({ detail }) {
  const node = app.graph?.getNodeById(Number(detail.node));
  if (!node || node.comfyClass !== TRAIN_NODE) return;
  node.tunekitStatus = `step ${detail.step}/${detail.total} · loss ${detail.loss.toFixed(4)}`;
  node.setDirtyCanvas(true, false);
}

app.registerExtension({
  name: "TuneKit.TrainingProgress",
  setup() {
    api.addEventListener("tunekit.progress", showProgress);
  },
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== TRAIN_NODE) return;
    const drawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      drawForeground?.apply(this, arguments);
      if (!this.tunekitStatus || this.flags?.collapsed) return;
      ctx.save();
      ctx.font = "12px sans-serif";
      ctx.fillStyle = "#8fd18f";
      ctx.fillText(this.tunekitStatus, 8, this.size[1] - 8);
      ctx.restore();
    };
  },
});
