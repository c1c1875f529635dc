package nerve_test

// The README's examples; compiled by `go test` (they have no Output, so they are not run).

import (
	"context"
	"errors"
	"fmt"
	"log"
	"time"

	nerve "github.com/nerve-bus/nerve/clients/go"
)

func Example() {
	ctx := context.Background()
	client, err := nerve.Dial("127.0.0.1:50051")
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()

	ev := nerve.NewEvent("//billing", "invoice.paid.v1").
		ID("inv-7").
		JSON(map[string]int{"amount": 12}).
		Priority(nerve.PriorityHigh).
		MustBuild()
	results, err := client.Publish(ctx, ev)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(results[0].GetSequence(), results[0].GetDuplicate())

	sub, err := client.Subscribe(ctx, nerve.SubscribeOptions{
		Types: []string{"invoice.>"},
		Group: "mailer",
		Start: nerve.StartEarliest(),
	})
	if err != nil {
		log.Fatal(err)
	}
	defer sub.Close()
	d, err := sub.Next(ctx)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(d.Event.GetId(), d.Attempt, d.Event.GetTextData())
	if err := d.Ack(); err != nil { // or d.Nack(5*time.Second), d.DeadLetter("bad input")
		log.Fatal(err)
	}
}

func ExampleClient_OpenPublisher() {
	ctx := context.Background()
	client, _ := nerve.Dial("127.0.0.1:50051")
	pub, err := client.OpenPublisher(ctx) // one PublishStream; ctx bounds the whole stream
	if err != nil {
		// the server refused the stream, e.g. nerve.ErrResourceExhausted: too many open streams
		log.Fatal(err)
	}
	ev1 := nerve.NewEvent("//billing", "invoice.paid.v1").ID("inv-8").JSON(map[string]int{"amount": 30}).MustBuild()
	ev2 := nerve.NewEvent("//billing", "invoice.paid.v1").ID("inv-9").JSON(map[string]int{"amount": 7}).MustBuild()
	// from any number of goroutines; one atomic batch, like client.Publish
	results, err := pub.Publish(ctx, ev1, ev2)
	if errors.Is(err, nerve.ErrAlreadyExists) { // a refused batch; the stream goes on
		log.Print(err)
	} else if err != nil { // another refusal, or the stream's error once it ended
		log.Fatal(err)
	} else {
		fmt.Println(results[0].GetSequence(), results[1].GetSequence()) // sequences follow send order
	}
	if err := pub.Close(); err != nil { // waits for the answers to every call already sent
		log.Fatal(err)
	}
}

func ExampleClient_Subscribe() {
	ctx := context.Background()
	client, _ := nerve.Dial("127.0.0.1:50051")
	sub, err := client.Subscribe(ctx, nerve.SubscribeOptions{
		Types:             []string{"orders.*", "payments.>"},
		Filter:            nerve.Exact(map[string]string{"subject": "eu-1"}),
		Start:             nerve.StartEarliest(), // or StartLatest(), StartAfter(seq), StartAt(t)
		MaxInFlight:       64,
		AckDeadline:       30 * time.Second,
		MaxAttempts:       5,
		HeartbeatInterval: 10 * time.Second,
		HeartbeatTimeout:  30 * time.Second, // default: 3 intervals; negative: never
	})
	if err != nil {
		log.Fatal(err)
	}
	defer sub.Close()
	historyCtx, cancelHistory := context.WithTimeout(ctx, 30*time.Second) // a full window holds the marker back
	defer cancelHistory()
	history, err := sub.UntilCaughtUp(historyCtx) // deliveries before the caught-up marker
	if err != nil {
		log.Fatal(err)
	}
	_ = sub.Ack(history...) // naming no delivery sends nothing
	seq, caughtUp := sub.CaughtUp()
	fmt.Println(len(history), seq, caughtUp)

	waitCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	for {
		d, err := sub.Next(waitCtx) // ctx errors leave the stream usable
		if err != nil {
			break // the context's error (a *nerve.Error), io.EOF, nerve.ErrClosed or the stream's *nerve.Error
		}
		_ = d.Ack()
	}
}

func ExampleClient_Request() {
	ctx := context.Background()
	client, _ := nerve.Dial("127.0.0.1:50051")

	// responder
	go func() {
		requests, err := client.Subscribe(ctx, nerve.SubscribeOptions{Types: []string{"planner.plan.requested"}, Group: "planners"})
		if err != nil {
			log.Fatal(err)
		}
		for {
			asked, err := requests.Next(ctx)
			if err != nil {
				return
			}
			answer := nerve.NewEvent("//planner", "planner.plan.ready").JSON(map[string]int{"steps": 3}).MustBuild()
			if _, err := client.Reply(ctx, asked.ReplyTo(), answer); err != nil {
				log.Print(err)
			}
			_ = asked.Ack()
		}
	}()

	// requester
	ask := nerve.NewEvent("//cli", "planner.plan.requested").JSON(map[string]string{"goal": "ship"}).MustBuild()
	resp, err := client.Request(ctx, ask, 10*time.Second)
	switch {
	case errors.Is(err, nerve.ErrNoResponders):
		log.Print("nobody is listening")
	case err != nil:
		log.Fatal(err)
	default:
		fmt.Println(resp.GetReply().GetCorrelationId(), resp.GetRequestSequence())
	}
}

func ExampleClient_Replay() {
	ctx := context.Background()
	client, _ := nerve.Dial("127.0.0.1:50051")
	replay := client.Replay(ctx, nerve.ReplayOptions{Types: []string{"orders.*"}, PageSize: 100, Limit: 150})
	for ev, err := range replay.All() {
		if err != nil {
			log.Fatal(err)
		}
		fmt.Println(ev.GetSequence(), ev.GetId())
	}
	more := client.Replay(ctx, nerve.ReplayOptions{Types: []string{"orders.*"}, ResumeToken: replay.ResumeToken()})
	for {
		ev, err := more.Next() // io.EOF at the end
		if err != nil {
			break
		}
		fmt.Println(ev.GetId())
	}
	fmt.Println(more.EndOfHistory())
}

func ExampleClient_DeadLetters() {
	ctx := context.Background()
	client, _ := nerve.Dial("127.0.0.1:50051")
	for letter, err := range client.DeadLetters(ctx, "mailer", 0) {
		if err != nil {
			log.Fatal(err)
		}
		fmt.Println(letter.GetEvent().GetId(), letter.GetReason())
	}
	n, _ := client.RedriveAllDeadLetters(ctx, "mailer") // or RedriveDeadLetters(ctx, "mailer", seq1, seq2)
	fmt.Println(n)
}

// The README's Admin block, but for the dead letters (ExampleClient_DeadLetters).
func ExampleClient_GetEvent() {
	ctx := context.Background()
	client, _ := nerve.Dial("127.0.0.1:50051")
	ev, err := client.GetEvent(ctx, "inv-7", "//billing")
	if err != nil { // nerve.ErrNotFound when no such event is stored
		log.Fatal(err)
	}
	fmt.Println(ev.GetSequence(), ev.GetType())
	groups, err := client.ListGroups(ctx) // every page
	if err != nil {
		log.Fatal(err)
	}
	for _, g := range groups {
		fmt.Println(g.GetName(), g.GetPending(), g.GetLag(), g.GetConsumers(), g.GetDeadLetters())
	}
	mailer, err := client.Group(ctx, "mailer") // nil when it does not exist
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(mailer.GetPending())
	deleted, err := client.DeleteGroup(ctx, "mailer") // false when it did not exist
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(deleted)
	types, err := client.ListEventTypes(ctx) // every page
	if err != nil {
		log.Fatal(err)
	}
	for _, t := range types {
		fmt.Println(t.GetType(), t.GetCount(), t.GetFirstSequence(), t.GetLastSequence())
	}
}

func ExampleError() {
	ctx := context.Background()
	client, _ := nerve.Dial("127.0.0.1:50051")
	_, err := client.Publish(ctx, nerve.NewEvent("//svc", "").MustBuild())
	var e *nerve.Error
	if errors.As(err, &e) {
		v, _ := e.Violation("events[0].type")
		fmt.Println(e.Code, v.Description)
	}
}
