// The caption editor: a grid of a dataset folder's thumbnails and captions, opened from the
// "Edit captions" button of TuneKit's Dataset from Folder node. It only displays and sends edits: listing,
// thumbnails, bulk operations, tag counts and saving are the server's (nodes/caption_routes.py), whose
// caption logic is TuneKit's core (trainer/captions).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const DATASET_NODE = "TuneKitDatasetFromFolder";
const ROUTES = "/tunekit/captions";
const PAGE_SIZE = 48; // cards in the DOM at once: 1,000 images stay smooth
const LIST_CHUNK = 2000; // the route's largest page: each page reads the whole folder
const THUMB_SIZE = 256;
const STYLESHEET = new URL("./caption_editor.css", import.meta.url);

async function call(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const response = await api.fetchApi(`${ROUTES}/${path}`, init);
  const answer = await response.json().catch(() => ({ error: `${response.status} ${response.statusText}` }));
  if (!response.ok) throw new Error(answer.error || `${response.status} ${response.statusText}`);
  return answer;
}

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name in node && name !== "list") node[name] = value;
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

function ensureStylesheet() {
  if (document.querySelector(`link[href="${STYLESHEET.href}"]`)) return;
  document.head.append(element("link", { rel: "stylesheet", href: STYLESHEET.href }));
}

class CaptionEditor {
  constructor({ folder, extension, recursive }) {
    Object.assign(this, { folder, extension, recursive });
    this.items = []; // { image, version, saved, caption, error }
    this.byImage = new Map();
    this.history = []; // undo stack: each entry maps image -> caption before the change
    this.filter = null; // { tag, images: Set }
    this.page = 0;
    this.selected = 0; // index into the visible (filtered) items
    this.onUnload = (event) => { if (this.dirty().length) event.preventDefault(); };
  }

  // ---- state -------------------------------------------------------------------------------------
  dirty() { return this.items.filter((item) => item.caption !== item.saved); }
  visible() { return this.filter ? this.items.filter((item) => this.filter.images.has(item.image)) : this.items; }
  captions(items = this.items) { return Object.fromEntries(items.map((item) => [item.image, item.caption])); }

  change(newCaptions) {
    const before = {};
    for (const [image, caption] of Object.entries(newCaptions)) {
      const item = this.byImage.get(image);
      if (!item || item.caption === caption) continue;
      before[image] = item.caption;
      item.caption = caption;
    }
    if (Object.keys(before).length) this.history.push(before);
    this.refresh();
    return Object.keys(before).length;
  }

  undo() {
    const before = this.history.pop();
    if (!before) return this.status("Nothing to undo.");
    for (const [image, caption] of Object.entries(before)) this.byImage.get(image).caption = caption;
    this.status(`Undid a change of ${Object.keys(before).length} caption(s).`);
    this.refresh();
  }

  // ---- server ------------------------------------------------------------------------------------
  query(extra) {
    return new URLSearchParams({ folder: this.folder, extension: this.extension,
      recursive: this.recursive ? "1" : "0", ...extra });
  }

  async load() {
    const started = performance.now();
    const items = [];
    for (let offset = 0, total = 1; offset < total; offset += LIST_CHUNK) {
      const page = await call(`list?${this.query({ offset, limit: LIST_CHUNK })}`);
      total = page.total;
      this.resolvedFolder = page.folder;
      items.push(...page.items.map((i) => ({ ...i, saved: i.caption })));
    }
    this.items = items;
    this.byImage = new Map(items.map((item) => [item.image, item]));
    this.status(`${items.length} images listed in ${Math.round(performance.now() - started)} ms.`);
  }

  async bulk(operation, parameters) {
    try {
      const { captions } = await call("apply", { operation, captions: this.captions(this.visible()), ...parameters });
      const count = this.change(captions);
      this.status(`${operation.replace("_", " ")}: ${count} caption(s) changed (unsaved).`);
    } catch (error) { this.status(error.message, true); }
  }

  async save() {
    const dirty = this.dirty();
    if (!dirty.length) return this.status("No unsaved changes.");
    try {
      const expected = Object.fromEntries(dirty.map((item) => [item.image, item.saved])); // refused if changed on disk
      const result = await call("save", { folder: this.folder, extension: this.extension, captions: this.captions(dirty), expected });
      for (const item of dirty) item.saved = item.caption;
      this.status(`Saved: ${result.written.length} caption file(s) written, ${result.unchanged.length} unchanged.`);
      this.refresh();
    } catch (error) { this.status(`Not saved: ${error.message}`, true); }
  }

  async updateTags() {
    clearTimeout(this.tagTimer);
    this.tagTimer = setTimeout(async () => {
      const captions = this.captions();
      const answer = await call("tags", { captions, tag: this.filter?.tag ?? null }).catch((e) => this.status(e.message, true));
      if (!answer) return;
      if (this.filter) this.filter.images = new Set(answer.images); // shown from the next page change on
      this.renderTags(answer.tags);
    }, 250);
  }

  async filterByTag(tag) {
    this.filter = this.filter?.tag === tag ? null : { tag, images: new Set() };
    if (this.filter) {
      const answer = await call("tags", { captions: this.captions(), tag });
      this.filter.images = new Set(answer.images);
    }
    this.page = 0;
    this.selected = 0;
    for (const li of this.tagList.children) li.classList.toggle("tk-active", li.dataset.tag === this.filter?.tag);
    this.refresh();
  }

  // ---- view --------------------------------------------------------------------------------------
  async open() {
    ensureStylesheet();
    this.root = element("div", { className: "tunekit-captions", tabIndex: -1, onkeydown: (e) => this.onKey(e) });
    this.statusLine = element("span", { className: "tk-status" });
    this.counts = element("span", { className: "tk-counts" });
    this.tagList = element("ol", { className: "tk-tags" });
    this.grid = element("div", { className: "tk-grid" });
    this.pager = element("div", { className: "tk-pager" });
    const find = element("input", { placeholder: "find", className: "tk-find" });
    const replacement = element("input", { placeholder: "replace with", className: "tk-replacement" });
    const regex = element("input", { type: "checkbox", className: "tk-regex" });
    const trigger = element("input", { placeholder: "trigger word", className: "tk-trigger" });
    const button = (label, onclick, className = "") => element("button", { className, onclick }, label);
    this.root.append(
      element("header", {},
        element("strong", {}, `Captions · ${this.folder}`), this.counts,
        button("Reload", () => this.reload(), "tk-reload"),
        button("Undo", () => this.undo(), "tk-undo"), button("Save", () => this.save(), "tk-save"),
        button("Close", () => this.close(), "tk-close")),
      element("div", { className: "tk-toolbar" },
        find, replacement, element("label", {}, regex, " regex"),
        button("Replace all", () => this.bulk("replace", { find: find.value, replacement: replacement.value, regex: regex.checked }), "tk-replace-all"),
        element("span", { className: "tk-gap" }),
        trigger,
        button("Add trigger", () => this.bulk("add_trigger", { trigger: trigger.value }), "tk-add-trigger"),
        button("Remove trigger", () => this.bulk("remove_trigger", { trigger: trigger.value }), "tk-remove-trigger")),
      element("div", { className: "tk-body" },
        element("aside", {}, element("div", { className: "tk-tags-title" }, "Tags (click to filter)"), this.tagList),
        element("main", {}, this.grid, this.pager)),
      element("footer", {}, this.statusLine));
    document.body.append(this.root);
    window.addEventListener("beforeunload", this.onUnload);
    try {
      await this.load();
      this.refresh();
      this.root.focus();
    } catch (error) { this.status(`Cannot open ${this.folder}: ${error.message}`, true); }
  }

  async reload() {
    const unsaved = this.dirty().length;
    if (unsaved && !window.confirm(`Reload the captions from disk and discard ${unsaved} unsaved change(s)?`)) return;
    this.history = [];
    try {
      await this.load();
      this.refresh();
    } catch (error) { this.status(`Cannot reload ${this.folder}: ${error.message}`, true); }
  }

  close() {
    const unsaved = this.dirty().length;
    if (unsaved && !window.confirm(`${unsaved} caption(s) have unsaved changes. Close and discard them?`)) return false;
    window.removeEventListener("beforeunload", this.onUnload);
    this.root.remove();
    return true;
  }

  status(text, isError = false) {
    this.statusLine.textContent = text;
    this.statusLine.classList.toggle("tk-error", isError);
  }

  refresh() {
    this.renderGrid();
    this.updateCounts();
  }

  // Counts and tags only: the grid (and the textarea being typed in or clicked) stays as it is.
  updateCounts() {
    const unsaved = this.dirty().length;
    this.counts.textContent = `${this.visible().length}/${this.items.length} images · ${unsaved} unsaved` +
      (this.filter ? ` · tag "${this.filter.tag}"` : "");
    this.root.classList.toggle("tk-has-unsaved", unsaved > 0);
    this.updateTags();
  }

  renderTags(tags) {
    this.tagList.replaceChildren(...tags.map(([tag, count]) => element("li", {
      className: this.filter?.tag === tag ? "tk-active" : "", title: `${count} caption(s) have "${tag}"`,
      "data-tag": tag, onclick: () => this.filterByTag(tag) }, element("span", {}, tag), element("em", {}, String(count)))));
  }

  renderGrid() {
    const visible = this.visible();
    const pages = Math.max(1, Math.ceil(visible.length / PAGE_SIZE));
    this.page = Math.min(this.page, pages - 1);
    const first = this.page * PAGE_SIZE;
    const focusedImage = this.grid.contains(document.activeElement) ? document.activeElement.closest(".tk-card")?.dataset.image : null;
    this.grid.replaceChildren(...visible.slice(first, first + PAGE_SIZE).map((item, i) => this.card(item, first + i)));
    const goto = (page) => { this.page = page; this.selected = page * PAGE_SIZE; this.renderGrid(); };
    this.pager.replaceChildren(
      element("button", { disabled: this.page === 0, onclick: () => goto(this.page - 1), className: "tk-prev" }, "‹ Prev"),
      element("span", {}, ` page ${this.page + 1} / ${pages} `),
      element("button", { disabled: this.page >= pages - 1, onclick: () => goto(this.page + 1), className: "tk-next" }, "Next ›"));
    if (focusedImage) this.grid.querySelector(`.tk-card[data-image="${CSS.escape(focusedImage)}"]`)?.focus();
  }

  card(item, index) {
    const thumb = api.apiURL(`${ROUTES}/thumbnail?${this.query({ image: item.image, size: THUMB_SIZE, v: item.version })}`);
    const text = element("textarea", { value: item.caption, rows: 4, spellcheck: false,
      onfocus: () => { this.selected = index; text.dataset.before = item.caption; },
      oninput: () => { item.caption = text.value; card.classList.toggle("tk-unsaved", item.caption !== item.saved); },
      onchange: () => this.commitEdit(item, text.dataset.before) });
    const card = element("div", { className: `tk-card${item.caption !== item.saved ? " tk-unsaved" : ""}`, tabIndex: 0,
      onclick: (event) => { if (event.target !== text) text.focus(); } },
      element("img", { src: thumb, loading: "lazy", decoding: "async", alt: item.image, width: THUMB_SIZE / 2, height: THUMB_SIZE / 2 }),
      element("div", { className: "tk-name", title: item.error || item.image }, item.error ? `⚠ ${item.image}` : item.image), text);
    card.dataset.image = item.image;
    card.dataset.index = index;
    return card;
  }

  commitEdit(item, before) {
    if (before === undefined || before === item.caption) return;
    this.history.push({ [item.image]: before });
    this.updateCounts();
  }

  // ---- keyboard ----------------------------------------------------------------------------------
  onKey(event) {
    const inText = event.target.tagName === "TEXTAREA" || event.target.tagName === "INPUT";
    const card = event.target.closest?.(".tk-card");
    event.stopPropagation(); // keep ComfyUI's canvas shortcuts out of the editor
    if ((event.ctrlKey || event.metaKey) && event.key === "s") { event.preventDefault(); event.target.blur?.(); this.save(); return; }
    if ((event.ctrlKey || event.metaKey) && event.key === "z" && !inText) { event.preventDefault(); this.undo(); return; }
    if (event.key === "Escape") {
      event.preventDefault();
      if (inText && card) card.focus();
      else this.close();
      return;
    }
    if (inText) return;
    if (card && event.key === "Enter") { event.preventDefault(); card.querySelector("textarea").focus(); return; }
    const step = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: this.columns(), ArrowUp: -this.columns(),
                   PageDown: PAGE_SIZE, PageUp: -PAGE_SIZE }[event.key];
    if (step === undefined) return;
    event.preventDefault();
    this.select((card ? Number(card.dataset.index) : this.selected) + step);
  }

  columns() {
    const cards = [...this.grid.children];
    const top = cards[0]?.offsetTop;
    return Math.max(1, cards.filter((c) => c.offsetTop === top).length);
  }

  select(index) {
    const count = this.visible().length;
    if (!count) return;
    this.selected = Math.max(0, Math.min(count - 1, index));
    const page = Math.floor(this.selected / PAGE_SIZE);
    if (page !== this.page) { this.page = page; this.renderGrid(); }
    const card = this.grid.querySelector(`.tk-card[data-index="${this.selected}"]`);
    card?.focus();
    card?.scrollIntoView({ block: "nearest" });
  }
}

export async function openCaptionEditor(options) {
  const editor = new CaptionEditor(options);
  await editor.open();
  return editor;
}

// The sidebar tab: every folder with images the editor may open (input/ and configured dataset roots).
async function renderFolderList(container) {
  ensureStylesheet();
  const list = element("ul", { className: "tk-folder-list" });
  const refresh = async () => {
    try {
      const { folders } = await call("folders");
      list.replaceChildren(...folders.map(({ folder, images }) => element("li", {},
        element("button", { title: `Open ${folder} in the caption editor (.txt captions)`,
          onclick: () => openCaptionEditor({ folder, extension: ".txt", recursive: false }) },
        element("span", {}, folder), element("em", {}, `${images} images`)))));
      if (!folders.length) list.replaceChildren(element("li", {}, "No folder with images in ComfyUI's input directory."));
    } catch (error) { list.replaceChildren(element("li", { className: "tk-error" }, error.message)); }
  };
  container.replaceChildren(element("div", { className: "tunekit-caption-folders" },
    element("header", {}, element("strong", {}, "Caption editor"), element("button", { onclick: refresh }, "Refresh")),
    list));
  await refresh();
}

function widgetValue(node, name, fallback) {
  return node.widgets?.find((w) => w.name === name)?.value ?? fallback;
}

app.registerExtension({
  name: "TuneKit.CaptionEditor",
  setup() {
    app.extensionManager?.registerSidebarTab?.({
      id: "tunekit-captions", icon: "pi pi-images", title: "Captions", tooltip: "Captions (TuneKit caption editor)",
      type: "custom", render: (container) => { renderFolderList(container); },
    });
  },
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== DATASET_NODE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const button = this.addWidget("button", "Edit captions", null, () => openCaptionEditor({
        folder: widgetValue(this, "folder", ""), extension: widgetValue(this, "caption_extension", ".txt"),
        recursive: widgetValue(this, "recursive", false) }), { serialize: false });
      button.serialize = false; // not a value: saved workflows and API prompts stay as they were
      return result;
    };
  },
});
