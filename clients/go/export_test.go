package nerve

// CloseWait is the bound of Subscription.Close, for tests that check it without waiting its full length; it
// applies to subscriptions opened after it is set.
var CloseWait = &closeWait

// KeepaliveParams is the keepalive Dial sets, for tests that cannot wait its full length; it applies to
// clients dialed after it is set.
var KeepaliveParams = &keepaliveParams
