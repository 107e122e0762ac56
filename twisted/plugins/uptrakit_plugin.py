"""twistd plugin: `twistd -n uptrakit`."""
from twisted.application.service import ServiceMaker

uptrakit = ServiceMaker(
    "uptrakit",
    "uptrakitd.process.tap",
    "Uptrakit controller security edge (identity, private CA, OCSP/CRL, service channel)",
    "uptrakit",
)

uptrakit_agent = ServiceMaker(
    "uptrakit-agent",
    "uptrakitd.agent.tap",
    "Reference Uptrakit service client: enrolls, renews, follows CA rotations",
    "uptrakit-agent",
)
