"""The notebook's drawing canvas.

The canvas is an anywidget: a few lines of JavaScript in this file, shipped to the browser at
run time, so nothing is built and a pointer (mouse, pen or finger) draws locally without a
round trip to the kernel per move. ipycanvas would draw from Python, one kernel message per
pointer move, for what needs only the finished stroke.
"""

import anywidget
import traitlets

CANVAS_ESM = """
function render({ model, el }) {
  const size = model.get("size");
  const canvas = Object.assign(document.createElement("canvas"), { width: size, height: size });
  canvas.className = "capsnet-canvas";
  canvas.style.cssText = "border: 1px solid #888; touch-action: none; cursor: crosshair";
  const pen = canvas.getContext("2d");
  const clear = () => {
    pen.fillStyle = "white";
    pen.fillRect(0, 0, size, size);
  };
  const at = (event) => {
    const box = canvas.getBoundingClientRect();
    return [(event.clientX - box.left) * size / box.width,
            (event.clientY - box.top) * size / box.height];
  };
  let last = null;  // where the stroke in progress has reached, null between strokes
  const draw = (to) => {
    Object.assign(pen, { lineWidth: model.get("pen_width"), lineCap: "round",
                         lineJoin: "round", strokeStyle: "black" });
    pen.beginPath();
    pen.moveTo(...last);
    pen.lineTo(...to);
    pen.stroke();
    last = to;
  };
  const send = (bytes) => {
    model.set("png", new DataView(bytes));
    model.save_changes();
  };
  const end = () => {
    if (last === null) return;
    last = null;
    canvas.toBlob(async (blob) => send(await blob.arrayBuffer()), "image/png");
  };
  canvas.addEventListener("pointerdown", (event) => {
    canvas.setPointerCapture(event.pointerId);
    last = at(event);
  });
  canvas.addEventListener("pointermove", (event) => last !== null && draw(at(event)));
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
  const button = Object.assign(document.createElement("button"), { textContent: "Clear" });
  button.className = "capsnet-clear jupyter-button";
  button.addEventListener("click", () => {
    clear();
    send(new ArrayBuffer(0));
  });
  clear();
  el.append(canvas, document.createElement("br"), button);
}
export default { render };
"""


def png_from_json(value, widget) -> bytes:
    """The canvas's PNG arrives from the browser as a memoryview: keep it as bytes."""
    return bytes(value)


class DrawingCanvas(anywidget.AnyWidget):
    """A square canvas to draw one digit on, black on white, with a Clear button.

    `png` holds the drawing as PNG bytes, sent when a stroke ends; b"" once cleared.
    Observe it to predict as the user draws.
    """

    _esm = CANVAS_ESM
    size = traitlets.Int(280).tag(sync=True)  # px: 10x MNIST's 28
    pen_width = traitlets.Int(18).tag(sync=True)  # px: MNIST strokes are ~2 px at 28 px
    png = traitlets.Bytes(b"").tag(sync=True, from_json=png_from_json)
