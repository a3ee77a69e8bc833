// Ogg pages around Opus packets (RFC 3533 framing, RFC 7845 for Opus): what /api/chat
// carries both ways. The codec is the browser's (WebCodecs); this only frames its packets.

"use strict";

const OGG_CRC = (() => {
  const table = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let r = i << 24;
    for (let k = 0; k < 8; k++) r = r & 0x80000000 ? (r << 1) ^ 0x04c11db7 : r << 1;
    table[i] = r >>> 0;
  }
  return table;
})();

function oggCrc(bytes) {
  let crc = 0;
  for (let i = 0; i < bytes.length; i++) crc = ((crc << 8) ^ OGG_CRC[((crc >>> 24) ^ bytes[i]) & 0xff]) >>> 0;
  return crc;
}

const ascii = (s) => Uint8Array.from(s, (c) => c.charCodeAt(0));
const startsWith = (p, magic) => p.length >= magic.length && magic.split("").every((c, i) => p[i] === c.charCodeAt(0));

// An Ogg stream of Opus packets going out: the two header pages first, then a page per
// call of `page` with the packets given.
class OggWriter {
  constructor(opusHead) {
    this.serial = (Math.random() * 0xffffffff) >>> 0;
    this.seq = 0;
    this.granule = 0; // 48 kHz samples, as Ogg Opus counts them
    this.head = opusHead;
  }

  headers() {
    const vendor = ascii("personaplex-fast web page");
    const tags = new Uint8Array(8 + 4 + vendor.length + 4);
    tags.set(ascii("OpusTags"));
    new DataView(tags.buffer).setUint32(8, vendor.length, true);
    tags.set(vendor, 12);
    return [this.build([this.head], 0x02), this.build([tags], 0)];
  }

  // packets: [{ data: Uint8Array, samples48k }]
  page(packets) {
    for (const p of packets) this.granule += p.samples48k;
    return this.build(packets.map((p) => p.data), 0);
  }

  build(packets, flags) {
    const lacing = [];
    for (const p of packets) {
      for (let n = p.length; ; n -= 255) {
        lacing.push(Math.min(n, 255));
        if (n < 255) break;
      }
    }
    const size = 27 + lacing.length + packets.reduce((a, p) => a + p.length, 0);
    const out = new Uint8Array(size);
    const view = new DataView(out.buffer);
    out.set(ascii("OggS"));
    out[5] = flags;
    view.setUint32(6, this.granule % 0x100000000, true);
    view.setUint32(10, Math.floor(this.granule / 0x100000000), true);
    view.setUint32(14, this.serial, true);
    view.setUint32(18, this.seq++, true);
    out[26] = lacing.length;
    out.set(lacing, 27);
    let at = 27 + lacing.length;
    for (const p of packets) { out.set(p, at); at += p.length; }
    view.setUint32(22, oggCrc(out), true);
    return out;
  }
}

// Opus packets out of incoming Ogg bytes (pages may be split across messages).
class OggReader {
  constructor() {
    this.carry = new Uint8Array(0);
    this.partial = [];
  }

  // -> [{ data: Uint8Array, head: bool, tags: bool }]
  packets(bytes) {
    const buf = new Uint8Array(this.carry.length + bytes.length);
    buf.set(this.carry);
    buf.set(bytes, this.carry.length);
    const out = [];
    let at = 0;
    while (at + 27 <= buf.length) {
      if (!startsWith(buf.subarray(at), "OggS")) throw new Error("not an Ogg stream");
      const n = buf[at + 26];
      const lacing = buf.subarray(at + 27, at + 27 + n);
      let end = at + 27 + n;
      for (const size of lacing) end += size;
      if (lacing.length < n || end > buf.length) break; // the rest of the page comes later
      let pos = at + 27 + n;
      for (const size of lacing) {
        this.partial.push(buf.subarray(pos, pos + size));
        pos += size;
        if (size < 255) {
          const data = new Uint8Array(this.partial.reduce((a, p) => a + p.length, 0));
          let o = 0;
          for (const p of this.partial) { data.set(p, o); o += p.length; }
          this.partial = [];
          out.push({ data, head: startsWith(data, "OpusHead"), tags: startsWith(data, "OpusTags") });
        }
      }
      at = end;
    }
    this.carry = buf.slice(at);
    return out;
  }
}
