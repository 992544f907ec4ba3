"""RealNet model parts: frozen backbone, AFS, reconstruction, RRS, decoder head."""
