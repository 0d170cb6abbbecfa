// Providers the proxy serves, with the key formats the admin API accepts.
// The patterns match the server's checks, so a key that fails here would be
// rejected there too.

export type ProviderName = "anthropic" | "openai" | "google";

export interface ProviderInfo {
  name: ProviderName;
  title: string;
  // prefix starts every key of the provider.
  prefix: string;
  placeholder: string;
  hint: string;
  pattern: RegExp;
  // rule explains a well-formed key when the check fails.
  rule: string;
}

const anthropicKeyOnOpenAI = "This is an Anthropic key (sk-ant-…); paste it on the Anthropic card.";

export const providers: readonly ProviderInfo[] = [
  {
    name: "anthropic",
    title: "Anthropic",
    prefix: "sk-ant-",
    placeholder: "sk-ant-…",
    hint: "Format: sk-ant-…",
    pattern: /^sk-ant-[A-Za-z0-9_-]{8,512}$/,
    rule: 'An Anthropic key starts with "sk-ant-" followed by letters, digits, "-" or "_".',
  },
  {
    name: "openai",
    title: "OpenAI",
    prefix: "sk-",
    placeholder: "sk-…",
    hint: "Format: sk-… or sk-proj-…",
    pattern: /^sk-[A-Za-z0-9_-]{8,512}$/,
    rule: 'An OpenAI key starts with "sk-" followed by letters, digits, "-" or "_".',
  },
  {
    name: "google",
    title: "Google AI",
    prefix: "AIza",
    placeholder: "AIza…",
    hint: "Format: AIza…, 39 characters",
    pattern: /^AIza[A-Za-z0-9_-]{35}$/,
    rule: 'A Google AI key is "AIza" followed by 35 letters, digits, "-" or "_" (39 characters).',
  },
];

// checkKey returns why key is not a well-formed key of the provider, or null
// when it is. The message never quotes the key.
export function checkKey(info: ProviderInfo, key: string): string | null {
  if (key === "") {
    return "Paste a key first.";
  }
  if (/\s/.test(key)) {
    return "The key contains spaces or line breaks; paste the key alone.";
  }
  if (info.name === "openai" && key.startsWith("sk-ant-")) {
    return anthropicKeyOnOpenAI;
  }
  if (info.name === "google" && key.startsWith("AIza") && key.length !== 39) {
    return `A Google AI key has 39 characters; this one has ${key.length}.`;
  }
  if (!info.pattern.test(key)) {
    return `This does not look like a valid ${info.title} key. ${info.rule}`;
  }
  return null;
}

// checkPrefix returns a problem as soon as a partly entered key cannot become
// a key of the provider, or null.
export function checkPrefix(info: ProviderInfo, key: string): string | null {
  if (info.name === "openai" && key.startsWith("sk-ant-")) {
    return anthropicKeyOnOpenAI;
  }
  if (key.startsWith(info.prefix) || info.prefix.startsWith(key)) {
    return null;
  }
  return `${info.title} keys start with "${info.prefix}". ${info.rule}`;
}
