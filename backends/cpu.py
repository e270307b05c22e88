"""ORT's CPU execution provider: always present, the reference for calibration and parity."""

from qtc.backends.base import Backend

CPU = Backend(name="cpu", provider="CPUExecutionProvider", recipes_native=("w8a8", "w8a16"))
