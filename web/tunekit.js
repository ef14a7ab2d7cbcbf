// Shows TuneKit's training on the Train LoRA node while it trains: step and loss, a small loss chart
// (training loss, and validation loss points when a Sample & Validate node is connected) and the latest
// samples. The server sends "tunekit.progress", "tunekit.validation" and "tunekit.sample" (nodes/host.py);
// this file only displays them.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TRAIN_NODE = "TuneKitTrainLoRA";
const CHART_HEIGHT = 70;
const SAMPLE_MAX = 160;
const MARGIN = 8;
const FOOTER = 22; // the status line under the panel

function trainNode(detail) {
  const node = app.graph?.getNodeById(Number(detail.node)) ?? app.graph?.getNodeById(detail.node);
  return node && node.comfyClass === TRAIN_NODE ? node : null;
}

// Per-node history; a new run (step back to the start) clears it.
function monitorOf(node, step) {
  let monitor = node.tunekitMonitor;
  if (!monitor || step < monitor.lastStep) {
    monitor = node.tunekitMonitor = { train: [], validation: [], samples: [], sampleStep: null, total: 1, lastStep: -1 };
  }
  monitor.lastStep = Math.max(monitor.lastStep, step);
  return monitor;
}

function showProgress({ detail }) {
  const node = trainNode(detail);
  if (!node) return;
  const monitor = monitorOf(node, detail.step - 1);
  monitor.total = detail.total;
  const loss = typeof detail.loss === "number" ? detail.loss : null;
  if (loss !== null) monitor.train.push([detail.step, loss]);
  node.tunekitStatus = `step ${detail.step}/${detail.total}` + (loss === null ? "" : ` · loss ${loss.toFixed(4)}`);
  node.setDirtyCanvas(true, false);
}

function showValidation({ detail }) {
  const node = trainNode(detail);
  if (!node) return;
  monitorOf(node, detail.step).validation.push([detail.step, detail.loss]);
  makeRoom(node);
  node.setDirtyCanvas(true, false);
}

function showSamples({ detail }) {
  const node = trainNode(detail);
  if (!node || !detail.images?.length) return;
  const monitor = monitorOf(node, detail.step);
  const images = detail.images.map((ref) => {
    const image = new Image();
    const query = new URLSearchParams({ filename: ref.filename, subfolder: ref.subfolder, type: ref.type });
    image.onload = () => node.setDirtyCanvas(true, false);
    image.src = api.apiURL(`/view?${query}`);
    return image;
  });
  monitor.samples = images;
  monitor.sampleStep = detail.step;
  makeRoom(node);
  node.setDirtyCanvas(true, true);
}

function sampleSize(node, count) {
  return count ? Math.min(SAMPLE_MAX, (node.size[0] - 2 * MARGIN) / count - 4) : 0;
}

function panelHeight(node) {
  const monitor = node.tunekitMonitor;
  const samples = monitor?.samples.length ?? 0;
  return CHART_HEIGHT + (samples ? sampleSize(node, samples) + 16 : 0) + MARGIN;
}

// Grow the node (once per need) so the panel sits below the widgets.
function makeRoom(node) {
  const needed = node.computeSize()[1] + panelHeight(node) + FOOTER;
  if (node.size[1] < needed) node.setSize([node.size[0], needed]);
}

function scaleOf(values) {
  let low = Math.min(...values);
  let high = Math.max(...values);
  if (high - low < 1e-9) { low -= 0.5; high += 0.5; }
  return { low, high };
}

function drawChart(ctx, monitor, x, y, width, height) {
  ctx.fillStyle = "rgba(0,0,0,0.25)";
  ctx.fillRect(x, y, width, height);
  const points = [...monitor.train, ...monitor.validation];
  if (!points.length) return;
  const { low, high } = scaleOf(points.map((p) => p[1]));
  const total = Math.max(monitor.total, ...points.map((p) => p[0]), 1);
  const px = (step) => x + (step / total) * width;
  const py = (loss) => y + height - 4 - ((loss - low) / (high - low)) * (height - 8);
  const line = (series, colour) => {
    ctx.strokeStyle = colour;
    ctx.beginPath();
    series.forEach(([step, loss], i) => (i ? ctx.lineTo(px(step), py(loss)) : ctx.moveTo(px(step), py(loss))));
    ctx.stroke();
  };
  ctx.lineWidth = 1;
  line(monitor.train, "#8fd18f");
  line(monitor.validation, "#f0a040");
  ctx.fillStyle = "#f0a040";
  for (const [step, loss] of monitor.validation) ctx.fillRect(px(step) - 2, py(loss) - 2, 4, 4);
  const last = monitor.validation.at(-1);
  ctx.font = "10px sans-serif";
  if (last) ctx.fillText(`val ${last[1].toFixed(4)} @${last[0]}`, x + 4, y + 11);
  ctx.fillStyle = "#aaa";
  ctx.fillText(`${high.toPrecision(3)}`, x + width - 40, y + 11);
  ctx.fillText(`${low.toPrecision(3)}`, x + width - 40, y + height - 4);
}

function drawSamples(ctx, node, monitor, x, y) {
  const size = sampleSize(node, monitor.samples.length);
  ctx.fillStyle = "#ccc";
  ctx.font = "10px sans-serif";
  ctx.fillText(`samples at step ${monitor.sampleStep}`, x, y + 10);
  monitor.samples.forEach((image, i) => {
    if (image.complete && image.naturalWidth) ctx.drawImage(image, x + i * (size + 4), y + 14, size, size);
  });
}

function drawMonitor(ctx, node) {
  const monitor = node.tunekitMonitor;
  if (!monitor || (!monitor.validation.length && !monitor.samples.length && monitor.train.length < 2)) return;
  const width = node.size[0] - 2 * MARGIN;
  const top = node.size[1] - FOOTER - panelHeight(node);
  drawChart(ctx, monitor, MARGIN, top, width, CHART_HEIGHT);
  if (monitor.samples.length) drawSamples(ctx, node, monitor, MARGIN, top + CHART_HEIGHT + 2);
}

app.registerExtension({
  name: "TuneKit.TrainingProgress",
  setup() {
    api.addEventListener("tunekit.progress", showProgress);
    api.addEventListener("tunekit.validation", showValidation);
    api.addEventListener("tunekit.sample", showSamples);
  },
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== TRAIN_NODE) return;
    const drawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      drawForeground?.apply(this, arguments);
      if (!this.tunekitStatus || this.flags?.collapsed) return;
      ctx.save();
      drawMonitor(ctx, this);
      ctx.font = "12px sans-serif";
      ctx.fillStyle = "#8fd18f";
      ctx.fillText(this.tunekitStatus, 8, this.size[1] - 8);
      ctx.restore();
    };
  },
});
