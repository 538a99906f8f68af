// The verdict icons, drawn as SVG elements (no markup strings, no image requests). The shape carries
// the meaning as much as the word: a tick, a cross, a question mark, an eye struck through.
const SVG = "http://www.w3.org/2000/svg";

const SHAPES = {
  genuine: [["path", { d: "M5 12.5l4.5 4.5L19 7.5" }]],
  counterfeit: [
    ["path", { d: "M6 6l12 12" }],
    ["path", { d: "M18 6L6 18" }],
  ],
  uncertain: [
    ["path", { d: "M8.5 9a3.5 3.5 0 1 1 5 3.2c-1 .5-1.5 1.2-1.5 2.3v.5" }],
    ["circle", { cx: "12", cy: "18.5", r: "0.6" }],
  ],
  not_recognised: [
    ["circle", { cx: "12", cy: "12", r: "8" }],
    ["path", { d: "M6.3 17.7L17.7 6.3" }],
  ],
};

export function verdictIcon(state) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("aria-hidden", "true");
  svg.setAttribute("focusable", "false");
  svg.classList.add("icon");
  for (const [tag, attributes] of SHAPES[state] || SHAPES.uncertain) {
    const shape = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attributes)) shape.setAttribute(name, value);
    svg.append(shape);
  }
  return svg;
}
