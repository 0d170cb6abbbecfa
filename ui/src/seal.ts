// Client-side encryption of a provider key to the proxy's age recipient, so
// that the plaintext key never leaves the browser.
import { Encrypter, armor } from "age-encryption";

// sealKey returns the ASCII-armored age ciphertext of key for recipient.
export async function sealKey(recipient: string, key: string): Promise<string> {
  if (!recipient.startsWith("age1")) {
    throw new Error("the proxy returned an invalid age recipient");
  }
  const encrypter = new Encrypter();
  encrypter.addRecipient(recipient);
  const ciphertext = await encrypter.encrypt(key);
  return armor.encode(ciphertext);
}
