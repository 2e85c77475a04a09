"""The side-by-side comparison image of ``convrot compare``."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

HEADER = 22
FOOTER = 34
MIN_PANEL = 320  # small images (the demo's 128 px) are enlarged, pixel for pixel, to stay legible


def side_by_side(reference: Image.Image, quantized: Image.Image, label: str, scores: dict, caption: str):
    """bf16 | quantized, labelled, with PSNR/SSIM (and LPIPS where ``scores`` has it) and a caption underneath."""
    scale = max(1, -(-MIN_PANEL // reference.width))
    width, height = reference.width * scale, reference.height * scale
    panels = [image.convert("RGB").resize((width, height), Image.NEAREST) for image in (reference, quantized)]
    font = ImageFont.load_default()
    canvas = Image.new("RGB", (2 * width, height + HEADER + FOOTER), "white")
    canvas.paste(panels[0], (0, HEADER))
    canvas.paste(panels[1], (width, HEADER))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), "bf16", fill="black", font=font)
    draw.text((width + 4, 4), label, fill="black", font=font)
    line = f"PSNR {scores['psnr_db']:.2f} dB   SSIM {scores['ssim']:.4f}"
    if scores.get("lpips") is not None:
        line += f"   LPIPS {scores['lpips']:.4f}"
    draw.text((4, HEADER + height + 3), line, fill="black")
    draw.text((4, HEADER + height + 18), caption, fill="black", font=font)
    return canvas
