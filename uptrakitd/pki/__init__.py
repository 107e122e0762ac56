"""The managed private CA: issuance, revocation, OCSP, CRLs, rotation (SPEC §4)."""
