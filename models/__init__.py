"""The reference zoo: models `qtc export NAME` knows, their committed weights and the tiny test decoder."""
