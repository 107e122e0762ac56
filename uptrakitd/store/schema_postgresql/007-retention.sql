-- version 7: retention. Start-up reads only the certificates that can still matter (by expiry), and pruning
-- finds old rows by it; an enrollment token remembers when its last use was counted.
CREATE INDEX certificates_expiry ON certificates(not_after);
ALTER TABLE enrollment_tokens ADD COLUMN used_up_at BIGINT;
