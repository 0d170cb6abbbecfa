// A small element builder, so that views are plain functions without a
// framework. Text always goes in as text nodes, never as HTML.

type Attrs = Record<string, string | boolean | undefined>;
type Child = Node | string | null | undefined | false;

export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Attrs = {},
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === false) {
      continue;
    }
    el.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) {
      continue;
    }
    el.append(child);
  }
  return el;
}

export type MessageKind = "info" | "ok" | "error";

// showMessage sets the text and kind of a message element; an empty text
// hides it.
export function showMessage(el: HTMLElement, kind: MessageKind, text: string): void {
  el.textContent = text;
  el.className = `msg msg-${kind}`;
  el.hidden = text === "";
}
