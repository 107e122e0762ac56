"""twistd plugin: `twistd -n uptrakit`."""
from twisted.application.service import ServiceMaker

uptrakit = ServiceMaker(
    "uptrakit",
    "uptrakitd.tap",
    "Uptrakit controller security edge (identity, private CA, OCSP/CRL, service channel)",
    "uptrakit",
)
