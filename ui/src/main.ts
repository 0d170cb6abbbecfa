// Entry point of the key settings page: sign-in, mailbox selection and the
// provider cards.

import "./style.css";
import { ApiError, SessionLost, getMailbox, getRecipient, resumeSession, signIn, signOut } from "./api";
import { ProviderCard, formatTime } from "./card";
import { h, showMessage } from "./dom";
import { providers } from "./providers";

// A mailbox id is 1 to 128 of these characters; the admin API rejects others.
const mailboxPattern = /^[A-Za-z0-9\-_.@+]{1,128}$/;

const app = document.getElementById("app") as HTMLElement;
const sessionBar = document.getElementById("session-bar") as HTMLElement;
const signOutButton = document.getElementById("sign-out") as HTMLButtonElement;
const banner = document.getElementById("banner") as HTMLElement;
const sessionState = document.getElementById("session-state") as HTMLElement;

// recipient caches the proxy's age recipient for the current session.
let recipient: Promise<string> | null = null;

function sessionLost(): void {
  showSignIn("error", "Your session has ended (it expired, was signed out, or the admin token changed). Sign in again.");
}

function showSignIn(kind: "info" | "error" | "ok" = "info", text = ""): void {
  recipient = null;
  showMessage(banner, "info", "");
  sessionBar.hidden = true;
  const token = h("input", {
    id: "admin-token",
    name: "admin-token",
    type: "password",
    autocomplete: "current-password",
    spellcheck: "false",
    autocapitalize: "off",
    required: true,
  });
  const button = h("button", { type: "submit", class: "primary" }, "Sign in");
  const message = h("p", { class: "msg", role: "alert", "data-role": "signin-message", hidden: true });
  const form = h(
    "form",
    { class: "stack", id: "signin-form", novalidate: true },
    h("label", { for: "admin-token" }, "Admin token"),
    token,
    button,
    message,
  );
  showMessage(message, kind, text);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    if (token.value === "") {
      showMessage(message, "error", "Enter the admin token.");
      return;
    }
    button.disabled = true;
    try {
      const expires = await signIn(token.value);
      token.value = "";
      showMain(expires);
    } catch (err) {
      showMessage(message, "error", err instanceof Error ? err.message : String(err));
      token.select();
    } finally {
      button.disabled = false;
    }
  });
  app.replaceChildren(
    h(
      "section",
      { class: "card signin", "aria-labelledby": "signin-title" },
      h("h1", { id: "signin-title" }, "Sign in"),
      h(
        "p",
        { class: "lead" },
        "Use this proxy's admin token. The session ends when you sign out or when it expires.",
      ),
      form,
    ),
  );
  token.focus();
}

function showMain(expires: string): void {
  sessionState.textContent = `Signed in until ${formatTime(expires)}`;
  sessionBar.hidden = false;
  showMessage(banner, "info", "");
  const input = h("input", {
    id: "mailbox-id",
    name: "mailbox",
    type: "text",
    autocomplete: "off",
    spellcheck: "false",
    autocapitalize: "off",
    placeholder: "alice@example.com",
    maxlength: "128",
    required: true,
  });
  const button = h("button", { type: "submit", class: "primary" }, "Open");
  const message = h("p", { class: "msg", role: "alert", "data-role": "mailbox-message", hidden: true });
  const content = h(
    "section",
    { id: "mailbox", "aria-live": "polite" },
    h("p", { class: "empty" }, "Enter a mailbox id to see and change its provider keys."),
  );
  const form = h(
    "form",
    { class: "mailbox-form", id: "mailbox-form", novalidate: true },
    h("label", { for: "mailbox-id" }, "Mailbox"),
    input,
    button,
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const id = input.value.trim();
    if (!mailboxPattern.test(id)) {
      showMessage(message, "error", "A mailbox id is 1 to 128 letters, digits or - _ . @ + characters.");
      return;
    }
    if (id === "." || id === "..") {
      // Browsers resolve such a path segment away, even percent-encoded,
      // so the request would reach another admin endpoint.
      showMessage(
        message,
        "error",
        `The mailbox id "${id}" cannot be managed from this page, because browsers remove it from request paths. Use "byokproxy keys" or the admin API with %2E for each dot.`,
      );
      return;
    }
    button.disabled = true;
    try {
      await openMailbox(id, content, message);
    } finally {
      button.disabled = false;
    }
  });
  app.replaceChildren(h("section", { class: "card toolbar" }, form, message), content);

  const fromHash = new URLSearchParams(location.hash.slice(1)).get("mailbox");
  if (fromHash && mailboxPattern.test(fromHash)) {
    input.value = fromHash;
    form.requestSubmit();
  } else {
    input.focus();
  }
}

async function openMailbox(id: string, content: HTMLElement, message: HTMLElement): Promise<void> {
  showMessage(message, "info", "");
  let status;
  try {
    status = await getMailbox(id);
  } catch (err) {
    if (err instanceof SessionLost) {
      sessionLost();
      return;
    }
    showMessage(message, "error", err instanceof ApiError ? err.message : String(err));
    return;
  }
  history.replaceState(null, "", "#" + new URLSearchParams({ mailbox: id }).toString());
  const ctx = {
    mailbox: id,
    recipient: () => {
      recipient ??= getRecipient().catch((err) => {
        recipient = null;
        throw err;
      });
      return recipient;
    },
    sessionLost,
  };
  const cards = providers.map((info) => new ProviderCard(info, ctx, status.providers[info.name]).el);
  content.replaceChildren(
    h(
      "div",
      { class: "mailbox-head" },
      h("h1", {}, "Keys of ", h("span", { class: "mailbox-name", "data-role": "mailbox-name" }, id)),
      h(
        "p",
        { class: "lead" },
        "Keys are encrypted in this browser to the proxy's age recipient before they are sent; only their last four characters are shown.",
      ),
    ),
    h("div", { class: "cards" }, ...cards),
  );
}

signOutButton.addEventListener("click", async () => {
  signOutButton.disabled = true;
  try {
    await signOut();
    showSignIn("ok", "You are signed out.");
  } catch (err) {
    if (err instanceof SessionLost) {
      sessionLost();
    } else {
      showMessage(banner, "error", `Sign-out failed: ${err instanceof Error ? err.message : String(err)}`);
    }
  } finally {
    signOutButton.disabled = false;
  }
});

async function start(): Promise<void> {
  try {
    const expires = await resumeSession();
    if (expires !== null) {
      showMain(expires);
      return;
    }
    showSignIn();
  } catch (err) {
    showSignIn("error", err instanceof Error ? err.message : String(err));
  }
}

void start();
