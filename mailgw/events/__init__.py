"""What a tracking hit records (T-1 to T-3, T-6, E-1).

Who fetched the pixel or followed the link: the client address (client.py, with
X-Forwarded-For from trusted proxies only), the user agent read into device, OS and
browser (agents.py), the place from a GeoIP file (geo.py), whether it was a person or a
machine (machine.py); and the recorder (recorder.py) that looks the delivery up and
writes the events through group commit.
"""
