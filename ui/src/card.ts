// One card per provider: the stored key's status, the source switch, and the
// save, test and remove actions. Only the last four characters of a stored key
// are ever shown; a pasted key is encrypted here and the input cleared.

import {
  ApiError,
  SessionLost,
  deleteKey,
  putSealedKey,
  setSource,
  testKey,
  type ProviderStatus,
  type Source,
  type TestResult,
} from "./api";
import { h, showMessage } from "./dom";
import { checkKey, checkPrefix, type ProviderInfo } from "./providers";
import { sealKey } from "./seal";

export interface CardContext {
  mailbox: string;
  recipient: () => Promise<string>;
  sessionLost: () => void;
}

const noKey: ProviderStatus = { source: "shared", has_key: false, last4: "", updated_at: null };

export class ProviderCard {
  readonly el: HTMLElement;
  private status: ProviderStatus;
  private readonly badge: HTMLElement;
  private readonly last4: HTMLElement;
  private readonly updated: HTMLElement;
  private readonly sourceButtons: Record<Source, HTMLButtonElement>;
  private readonly sourceHelp: HTMLElement;
  private readonly keyLabel: HTMLElement;
  private readonly input: HTMLInputElement;
  private readonly saveButton: HTMLButtonElement;
  private readonly testButton: HTMLButtonElement;
  private readonly removeButton: HTMLButtonElement;
  private readonly confirmRow: HTMLElement;
  private readonly message: HTMLElement;
  private busy = false;

  constructor(
    private readonly info: ProviderInfo,
    private readonly ctx: CardContext,
    status: ProviderStatus | undefined,
  ) {
    this.status = status ?? noKey;
    const inputId = `key-${info.name}`;
    const hintId = `hint-${info.name}`;

    this.badge = h("span", { class: "badge", "data-role": "source-badge" });
    this.last4 = h("dd", { "data-role": "last4" });
    this.updated = h("dd", { "data-role": "updated" });
    this.sourceButtons = {
      shared: h("button", { type: "button", role: "radio", "data-source": "shared" }, "Shared pool"),
      byok: h("button", { type: "button", role: "radio", "data-source": "byok" }, "Own key"),
    };
    this.sourceHelp = h("p", { class: "help", "data-role": "source-help" });
    this.keyLabel = h("label", { for: inputId });
    this.input = h("input", {
      id: inputId,
      type: "password",
      autocomplete: "off",
      spellcheck: "false",
      autocapitalize: "off",
      autocorrect: "off",
      placeholder: info.placeholder,
      "aria-describedby": hintId,
      "data-1p-ignore": true,
      "data-lpignore": "true",
      "data-form-type": "other",
    });
    this.saveButton = h("button", { type: "button", class: "primary", "data-action": "save" }, "Save");
    this.testButton = h("button", { type: "button", "data-action": "test" }, "Test key");
    this.removeButton = h("button", { type: "button", class: "danger-outline", "data-action": "remove" }, "Remove key");
    this.message = h("p", { class: "msg", "data-role": "message", role: "status", "aria-live": "polite", hidden: true });

    const confirmButton = h("button", { type: "button", class: "danger", "data-action": "confirm-remove" }, "Remove");
    const cancelButton = h("button", { type: "button", "data-action": "cancel-remove" }, "Cancel");
    this.confirmRow = h(
      "div",
      { class: "confirm", "data-role": "confirm", hidden: true },
      h("p", {}, `Remove the stored ${info.title} key of this mailbox? Its requests go back to the shared pool.`),
      h("div", { class: "row" }, confirmButton, cancelButton),
    );

    this.el = h(
      "article",
      { class: "card provider", "data-provider": info.name },
      h("header", { class: "card-head" }, h("h2", {}, info.title), this.badge),
      h("dl", { class: "facts" }, h("dt", {}, "Stored key"), this.last4, h("dt", {}, "Updated"), this.updated),
      h(
        "div",
        { class: "field" },
        h("span", { class: "label", id: `source-${info.name}` }, "Key source"),
        h(
          "div",
          { class: "segmented", role: "radiogroup", "aria-labelledby": `source-${info.name}` },
          this.sourceButtons.shared,
          this.sourceButtons.byok,
        ),
        this.sourceHelp,
      ),
      h(
        "div",
        { class: "field" },
        this.keyLabel,
        h("div", { class: "row" }, this.input, this.saveButton),
        h("p", { class: "help", id: hintId }, info.hint),
      ),
      h("div", { class: "row actions" }, this.testButton, this.removeButton),
      this.confirmRow,
      this.message,
    );

    this.saveButton.addEventListener("click", () => this.run(() => this.save()));
    this.input.addEventListener("keydown", (e) => {
      if (e.key === "Enter") {
        e.preventDefault();
        this.run(() => this.save());
      }
    });
    this.input.addEventListener("input", () => this.checkAsTyped(false));
    this.input.addEventListener("change", () => this.checkAsTyped(true));
    for (const source of ["shared", "byok"] as const) {
      this.sourceButtons[source].addEventListener("click", () => this.run(() => this.changeSource(source)));
    }
    this.testButton.addEventListener("click", () => this.run(() => this.test()));
    this.removeButton.addEventListener("click", () => {
      this.confirmRow.hidden = false;
      this.render();
      cancelButton.focus();
    });
    cancelButton.addEventListener("click", () => {
      this.confirmRow.hidden = true;
      this.render();
    });
    confirmButton.addEventListener("click", () => this.run(() => this.remove()));
    this.render();
  }

  private render(): void {
    const st = this.status;
    const own = st.source === "byok";
    this.badge.textContent = own ? "Own key" : "Shared pool";
    this.badge.className = `badge ${own ? "badge-own" : "badge-shared"}`;
    this.last4.textContent = st.has_key ? `•••• ${st.last4}` : "None";
    this.last4.classList.toggle("muted", !st.has_key);
    this.updated.textContent = st.has_key && st.updated_at ? formatTime(st.updated_at) : "—";
    this.updated.classList.toggle("muted", !(st.has_key && st.updated_at));
    for (const source of ["shared", "byok"] as const) {
      const button = this.sourceButtons[source];
      const active = st.source === source;
      button.setAttribute("aria-checked", String(active));
      button.classList.toggle("active", active);
      button.disabled = this.busy || !st.has_key;
    }
    this.sourceHelp.textContent = st.has_key
      ? own
        ? "Requests use the stored key, unmetered."
        : "Requests use the platform key, metered."
      : "Add a key to switch to it.";
    this.keyLabel.textContent = st.has_key ? "Replace key" : "Add key";
    this.input.disabled = this.busy;
    this.saveButton.disabled = this.busy;
    this.testButton.disabled = this.busy || !st.has_key;
    this.removeButton.disabled = this.busy || !st.has_key || !this.confirmRow.hidden;
    for (const button of this.confirmRow.querySelectorAll("button")) {
      button.disabled = this.busy;
    }
    this.el.classList.toggle("busy", this.busy);
  }

  // run performs one action with the card's controls disabled, and turns its
  // failure into a message on the card (or the sign-in page for a lost
  // session).
  private async run(action: () => Promise<void>): Promise<void> {
    if (this.busy) {
      return;
    }
    this.busy = true;
    this.render();
    try {
      await action();
    } catch (err) {
      if (err instanceof SessionLost) {
        this.ctx.sessionLost();
        return;
      }
      const text = err instanceof Error ? err.message : String(err);
      showMessage(this.message, "error", text);
    } finally {
      this.busy = false;
      this.render();
    }
  }

  // checkAsTyped flags a wrong prefix while the key is typed or pasted, and
  // the full format once the input loses focus.
  private checkAsTyped(full: boolean): void {
    const key = this.input.value.trim();
    let problem: string | null = null;
    if (key !== "") {
      problem = full ? checkKey(this.info, key) : checkPrefix(this.info, key);
    }
    if (problem) {
      showMessage(this.message, "error", problem);
      this.message.dataset.kind = "format";
    } else if (this.message.dataset.kind === "format") {
      showMessage(this.message, "info", "");
      delete this.message.dataset.kind;
    }
  }

  private async save(): Promise<void> {
    const key = this.input.value.trim();
    const problem = checkKey(this.info, key);
    if (problem) {
      showMessage(this.message, "error", problem);
      this.message.dataset.kind = "format";
      return;
    }
    delete this.message.dataset.kind;
    showMessage(this.message, "info", "Encrypting and saving…");
    let armored: string;
    try {
      armored = await sealKey(await this.ctx.recipient(), key);
    } finally {
      this.input.value = "";
    }
    try {
      this.status = await putSealedKey(this.ctx.mailbox, this.info.name, armored);
    } catch (err) {
      if (err instanceof ApiError) {
        throw new ApiError(err.status, `The key was not saved: ${err.message} Paste it again to retry.`);
      }
      throw err;
    }
    this.confirmRow.hidden = true;
    const next =
      this.status.source === "byok" ? "Requests use it now." : "Select Own key to use it for this mailbox's requests.";
    showMessage(this.message, "ok", `Key saved: •••• ${this.status.last4}. ${next}`);
  }

  private async changeSource(source: Source): Promise<void> {
    if (this.status.source === source) {
      return;
    }
    this.status = await setSource(this.ctx.mailbox, this.info.name, source);
    showMessage(
      this.message,
      "ok",
      this.status.source === "byok" ? "Source set to own key." : "Source set to the shared pool.",
    );
  }

  private async test(): Promise<void> {
    showMessage(this.message, "info", `Sending a one-token request to ${this.info.title}…`);
    const result = await testKey(this.ctx.mailbox, this.info.name);
    showMessage(this.message, result.ok ? "ok" : "error", describeTest(this.info.title, result));
  }

  private async remove(): Promise<void> {
    await deleteKey(this.ctx.mailbox, this.info.name);
    this.status = noKey;
    this.confirmRow.hidden = true;
    showMessage(this.message, "ok", "Key removed. This mailbox now uses the shared pool for " + this.info.title + ".");
  }
}

function describeTest(title: string, r: TestResult): string {
  if (r.ok) {
    return `Key works: ${title} responded with HTTP ${r.status}.`;
  }
  if (r.status === 0) {
    return `Test failed: no response from ${title}. ${r.error}`;
  }
  const detail = r.error ? ` Message: ${r.error}` : "";
  return `Test failed: ${title} responded with HTTP ${r.status}.${detail}`;
}

// formatTime shows an RFC 3339 time in UTC, as the admin API reports it.
export function formatTime(iso: string): string {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) {
    return iso;
  }
  return d.toISOString().slice(0, 16).replace("T", " ") + " UTC";
}
