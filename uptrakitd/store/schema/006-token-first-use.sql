-- version 6: when an admin token was first used (the audit trail records that moment once)
ALTER TABLE admin_tokens ADD COLUMN first_used_at INTEGER;
