// The live camera (getUserMedia) where the browser offers it: a still frame becomes a JPEG file in the
// queue. Phones also get the plain capture input, which opens the camera app.
import { t } from "./i18n.js";

export function cameraAvailable() {
  return Boolean(navigator.mediaDevices && navigator.mediaDevices.getUserMedia);
}

export class Camera {
  constructor(dialog, onPhoto) {
    this.dialog = dialog;
    this.video = dialog.querySelector("video");
    this.message = dialog.querySelector(".message");
    this.snap = dialog.querySelector("#camera-snap");
    this.onPhoto = onPhoto;
    this.stream = null;
    this.snap.addEventListener("click", () => this.capture());
    dialog.querySelector("#camera-close").addEventListener("click", () => dialog.close());
    dialog.addEventListener("close", () => this.stop());
  }

  async open() {
    this.message.textContent = "";
    this.snap.disabled = true;
    this.dialog.showModal();
    try {
      this.stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "environment" }, audio: false });
      this.video.srcObject = this.stream;
      this.snap.disabled = false;
    } catch (error) {
      this.message.textContent = t("camera.failed", { message: error && error.name ? error.name : String(error) });
    }
  }

  capture() {
    const { videoWidth: width, videoHeight: height } = this.video;
    if (!width || !height) return;
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    canvas.getContext("2d").drawImage(this.video, 0, 0, width, height);
    canvas.toBlob((blob) => {
      if (!blob) return;
      const stamp = new Date().toISOString().replace(/[:.]/g, "-");
      this.onPhoto(new File([blob], `camera-${stamp}.jpg`, { type: "image/jpeg" }));
      this.dialog.close();
    }, "image/jpeg", 0.92);
  }

  stop() {
    if (this.stream) for (const track of this.stream.getTracks()) track.stop();
    this.stream = null;
    this.video.srcObject = null;
  }
}
