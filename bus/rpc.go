package bus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
	"github.com/rbee-dev/rbee/api"
)

// ErrNoResponder means nobody serves the subject: the queen, hive or worker
// is not running (NATS says so at once, no timeout needed).
var ErrNoResponder = errors.New("no responder")

// Endpoints runs micro endpoint handlers off the subscription goroutine, so a
// slow request does not hold up the next one, and tracks them so a shutdown
// can wait for in-flight requests to finish.
type Endpoints struct {
	wg  sync.WaitGroup
	sem chan struct{}
	// Timeout bounds each handler.
	Timeout time.Duration
	Log     func(endpoint string, err error)
}

// NewEndpoints allows up to concurrency handlers at once.
func NewEndpoints(concurrency int, timeout time.Duration) *Endpoints {
	return &Endpoints{sem: make(chan struct{}, concurrency), Timeout: timeout}
}

// Wait blocks until every in-flight handler has answered or ctx ends.
func (e *Endpoints) Wait(ctx context.Context) error {
	done := make(chan struct{})
	go func() { e.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Handler adapts fn to a micro handler: it decodes the JSON request (an
// empty body decodes as the zero value), runs fn with a deadline, and answers
// the result as JSON or an error with its code. A malformed payload is a 400,
// never a crash; a panic in fn is a 500.
func Handler[Req, Resp any](e *Endpoints, name string, fn func(context.Context, Req) (Resp, error)) micro.Handler {
	return micro.HandlerFunc(func(r micro.Request) {
		e.sem <- struct{}{}
		e.wg.Add(1)
		go func() {
			defer e.wg.Done()
			defer func() { <-e.sem }()
			defer func() {
				if p := recover(); p != nil {
					respondErr(e, name, r, api.Errorf(api.CodeInternal, "internal error in %s: %v", name, p))
				}
			}()
			var req Req
			if len(r.Data()) > 0 {
				if err := json.Unmarshal(r.Data(), &req); err != nil {
					respondErr(e, name, r, api.Errorf(api.CodeBadRequest, "malformed %s request: %v", name, err))
					return
				}
			}
			ctx, cancel := context.WithTimeout(context.Background(), e.Timeout)
			defer cancel()
			resp, err := fn(ctx, req)
			if err != nil {
				respondErr(e, name, r, err)
				return
			}
			if err := r.RespondJSON(resp); err != nil && e.Log != nil {
				e.Log(name, err)
			}
		}()
	})
}

// Headers that carry an *api.Error's reason and parameter next to micro's
// own error description and code, so Call rebuilds the whole error.
const (
	ReasonHeader = "Rbee-Error-Reason"
	ParamHeader  = "Rbee-Error-Param"
)

func respondErr(e *Endpoints, name string, r micro.Request, err error) {
	ae := api.AsError(err)
	if e.Log != nil && ae.Code >= 500 {
		e.Log(name, err)
	}
	// Call tells an error by its description, which NATS trims: an error
	// without a word would cross the bus as success.
	msg := ae.Message
	if strings.TrimSpace(msg) == "" {
		msg = fmt.Sprintf("%s (code %s, no message)", api.ReasonOf(ae), api.CodeString(ae.Code))
	}
	h := micro.Headers{
		micro.ErrorHeader:     {msg},
		micro.ErrorCodeHeader: {api.CodeString(ae.Code)},
		ReasonHeader:          {string(ae.Reason)},
	}
	if ae.Param != "" {
		h[ParamHeader] = []string{ae.Param}
	}
	// Not r.Error: it records the error in a field that micro's dispatcher
	// reads once the handler returns, and Handler answers from a goroutine
	// of its own after that, which is a data race. Respond with the same
	// headers puts the same reply on the wire and records nothing.
	_ = r.Respond(nil, micro.WithHeaders(h))
}

// Call sends a JSON request to subject and decodes the JSON reply into out.
// An error answer comes back as *api.Error with its code, reason and
// parameter (a responder that sends no reason gets its code's); nobody
// serving the subject is ErrNoResponder.
func (b *Bus) Call(ctx context.Context, subject string, req, out any) error {
	var data []byte
	if req != nil {
		var err error
		if data, err = json.Marshal(req); err != nil {
			return err
		}
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
	}
	msg, err := b.NC.RequestWithContext(ctx, subject, data)
	if errors.Is(err, nats.ErrNoResponders) {
		return fmt.Errorf("%w on %s", ErrNoResponder, subject)
	}
	if err != nil {
		return fmt.Errorf("request %s: %w", subject, err)
	}
	if desc := msg.Header.Get(micro.ErrorHeader); desc != "" {
		code, _ := strconv.Atoi(msg.Header.Get(micro.ErrorCodeHeader))
		e := &api.Error{Code: code, Reason: api.Reason(msg.Header.Get(ReasonHeader)), Param: msg.Header.Get(ParamHeader), Message: desc}
		e.Reason = api.ReasonOf(e)
		return e
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(msg.Data, out); err != nil {
		return fmt.Errorf("malformed reply from %s: %w", subject, err)
	}
	return nil
}
