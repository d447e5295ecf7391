-- Personal data is answered to its owner only. A payment names who pays (from v2 of
-- PaymentAuthorized/PaymentDeclined; NULL for payments recorded before, which only
-- operators may read), and a profile shows the user's roles (operator).
ALTER TABLE payment_statuses ADD COLUMN customer_id uuid;
ALTER TABLE user_profiles ADD COLUMN roles text[] NOT NULL DEFAULT '{}';
