// The modality a file most likely is, from its bytes (never its name): DICOM, and 16-bit PNG or TIFF,
// are what X-ray consoles export; everything else is taken for a photo. The officer can override it.

async function bytesOf(file, start, length) {
  const end = Math.min(file.size, start + length);
  if (start >= end) return new Uint8Array(0);
  return new Uint8Array(await file.slice(start, end).arrayBuffer());
}

function isDicom(head) {
  return head.length >= 132 && head[128] === 0x44 && head[129] === 0x49 && head[130] === 0x43 && head[131] === 0x4d;
}

function isPng16(head) {
  const signature = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];
  // IHDR is the first chunk: its bit depth is byte 24 of the file.
  return head.length > 24 && signature.every((b, i) => head[i] === b) && head[24] === 16;
}

/** Bits per sample of a TIFF's first image, or 0 when it cannot be read. */
async function tiffBits(file, head) {
  const little = head[0] === 0x49 && head[1] === 0x49 && head[2] === 0x2a && head[3] === 0;
  const big = head[0] === 0x4d && head[1] === 0x4d && head[2] === 0 && head[3] === 0x2a;
  if (!little && !big) return 0;
  const view = new DataView(head.buffer, head.byteOffset, head.byteLength);
  const ifdOffset = view.getUint32(4, little);
  const countBytes = await bytesOf(file, ifdOffset, 2);
  if (countBytes.length < 2) return 0;
  const count = new DataView(countBytes.buffer).getUint16(0, little);
  const entries = await bytesOf(file, ifdOffset + 2, Math.min(count, 64) * 12);
  const table = new DataView(entries.buffer);
  for (let at = 0; at + 12 <= entries.length; at += 12) {
    if (table.getUint16(at, little) !== 258) continue; // BitsPerSample
    const type = table.getUint16(at + 2, little); // 3 = SHORT
    const values = table.getUint32(at + 4, little);
    if (type !== 3) return 0;
    if (values <= 2) return table.getUint16(at + 8, little);
    const first = await bytesOf(file, table.getUint32(at + 8, little), 2);
    return first.length === 2 ? new DataView(first.buffer).getUint16(0, little) : 0;
  }
  return 1; // no BitsPerSample: the TIFF default, bilevel
}

/** "xray" or "photo". */
export async function inferModality(file) {
  const head = await bytesOf(file, 0, 512);
  if (isDicom(head) || isPng16(head)) return "xray";
  if (head.length >= 8 && (await tiffBits(file, head)) === 16) return "xray";
  return "photo";
}
