package nerve

// CloseWait is the bound of Subscription.Close, for tests that check it without waiting its full length; it
// applies to subscriptions opened after it is set.
var CloseWait = &closeWait

// KeepaliveParams is the keepalive Dial sets, for tests that cannot wait its full length; it applies to
// clients dialed after it is set.
var KeepaliveParams = &keepaliveParams

// Ended is closed once the subscription's stream ended and its end was read off the network, for tests
// that need the end to have come before they act, without reading it as Next would.
func Ended(s *Subscription) <-chan struct{} { return s.done }

// ResumeBackoff is the wait before a replay's n-th reopening in a row.
var ResumeBackoff = resumeBackoff

// HoldSendsThatFindTheEnd makes every send of a Subscription (a settle, Credit, SetFilter) whose Send finds
// the stream ended signal held, then wait until release is closed, before it lets the receiver know the
// stream ended. The returned func undoes it.
func HoldSendsThatFindTheEnd(held chan<- struct{}, release <-chan struct{}) (restore func()) {
	hook := func() {
		held <- struct{}{}
		<-release
	}
	sendFoundEnd.Store(&hook)
	return func() { sendFoundEnd.Store(nil) }
}
