// Notes and stars per direction: kept in this browser per adapter, exported and imported as
// JSON. Stored and imported notes are untrusted input like the data.
/* global Dom */
/* exported Notes */
const Notes = (() => {
  const { el } = Dom;

  // Only {text: string, star: boolean} entries survive.
  function validNotes(object) {
    const valid = new Map();
    if (!object || typeof object !== "object") return valid;
    for (const [key, note] of Object.entries(object)) {
      const text = typeof note?.text === "string" ? note.text : "";
      const star = note?.star === true;
      if (text || star) valid.set(key, { text, star });
    }
    return valid;
  }

  // meta: the run's metadata; elements: {count, status, list}; link(key, text): a link that
  // opens a direction. One store per adapter: the keys (L12.gate_proj[0]) name the same
  // directions in every file of that adapter, so notes follow a re-run.
  function create(meta, elements, link) {
    const store = `lora-dashboard-notes:${meta.adapter}`;
    const notes = read();

    function read() {
      try {
        return validNotes(JSON.parse(localStorage.getItem(store)));
      } catch {
        return new Map(); // storage disabled, or not JSON
      }
    }

    function write() {
      try {
        localStorage.setItem(store, JSON.stringify(Object.fromEntries(notes)));
      } catch {
        elements.status.textContent = "this browser does not keep notes here: export them";
      }
      list();
    }

    function set(key, change) {
      const note = { text: "", star: false, ...notes.get(key), ...change };
      if (note.text || note.star) notes.set(key, note);
      else notes.delete(key);
      write();
    }

    function list() {
      elements.count.textContent = `${notes.size} ${notes.size === 1 ? "note" : "notes"}`;
      const keys = [...notes.keys()].sort((a, b) => a.localeCompare(b, "en", { numeric: true }));
      elements.list.replaceChildren(...keys.map((key) => {
        const { text, star } = notes.get(key);
        const item = el("li");
        item.append(star ? "★ " : "", link(key, key), " ", el("span", "note-text", text));
        return item;
      }));
    }

    function starButton(key) {
      const button = el("button", "star");
      button.type = "button";
      const draw = () => {
        const starred = Boolean(notes.get(key)?.star);
        button.textContent = starred ? "★" : "☆";
        button.setAttribute("aria-pressed", String(starred));
        button.title = starred ? "starred: click to unstar" : "star this direction";
      };
      button.addEventListener("click", () => {
        set(key, { star: !notes.get(key)?.star });
        draw();
      });
      draw();
      return button;
    }

    function noteBox(key) {
      const box = el("textarea", "note");
      box.rows = 1;
      box.placeholder = "Your interpretation of this direction…";
      box.setAttribute("aria-label", `interpretation of ${key}`);
      box.value = notes.get(key)?.text || "";
      box.addEventListener("input", () => set(key, { text: box.value }));
      return box;
    }

    // A file a team can share: the page's adapter, and every note by key.
    function exportAll() {
      const file = {
        adapter: meta.adapter,
        base_model: meta.base_model,
        exported_at: new Date().toISOString(),
        notes: Object.fromEntries(notes),
      };
      const a = el("a");
      const blob = new Blob([JSON.stringify(file, null, 2)], { type: "application/json" });
      a.href = URL.createObjectURL(blob);
      a.download = `lora-notes-${String(meta.adapter).replace(/[^\w.-]+/g, "_")}.json`;
      a.click();
      setTimeout(() => URL.revokeObjectURL(a.href), 1000);
    }

    // Imported notes replace those of the same direction; the others stay. Resolves true once
    // they are stored (false: not a JSON file).
    async function importFile(file) {
      let imported;
      try {
        imported = JSON.parse(await file.text());
      } catch {
        elements.status.textContent = `${file.name}: not a JSON file`;
        return false;
      }
      const incoming = validNotes(imported?.notes);
      for (const [key, note] of incoming) notes.set(key, note);
      write();
      const adapter = imported?.adapter;
      const other = adapter && adapter !== meta.adapter ? ` (written for ${adapter})` : "";
      elements.status.textContent = `imported ${incoming.size} notes from ${file.name}${other}`;
      return true;
    }

    list();
    return { starButton, noteBox, exportAll, importFile };
  }

  return { validNotes, create };
})();
