// Placeholder until the view lands.
import { h, heading } from "../ui.js";
export function render(main) {
  main.append(heading("overview"), h("p", {}, "Not built yet."));
}
